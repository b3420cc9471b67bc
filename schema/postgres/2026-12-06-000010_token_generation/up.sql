-- Raised whenever a user's password changes: login tokens carry the generation they were issued
-- under, and one from an earlier generation is refused, so a password change ends every login.
ALTER TABLE users ADD COLUMN token_generation BIGINT NOT NULL DEFAULT 0;

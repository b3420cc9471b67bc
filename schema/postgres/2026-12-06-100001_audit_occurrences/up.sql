-- Repeated refusals of one kind from one source within a minute are one row that counts them
-- (src/audit.rs): an unauthenticated flood must not grow the audit log row by row.
ALTER TABLE audit_log ADD COLUMN occurrences BIGINT NOT NULL DEFAULT 1;

-- The retention (storage.audit_retention_days) deletes by age.
CREATE INDEX audit_log_at ON audit_log (at);

ALTER TABLE campaign_devices DROP COLUMN deadline_at;
ALTER TABLE campaigns DROP COLUMN paused_at;

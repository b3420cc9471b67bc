-- A paused campaign's devices keep the time they had left: each device's job has a deadline
-- (set when it is notified, notified_at + the campaign's timeout), and resuming moves the
-- deadlines of the devices still working by the time the campaign spent paused (paused_at).
ALTER TABLE campaigns ADD COLUMN paused_at BIGINT;
ALTER TABLE campaign_devices ADD COLUMN deadline_at BIGINT;

DROP TABLE device_commands;
DROP TABLE job_devices;
DROP TABLE jobs;
DROP INDEX device_shadows_firmware;
ALTER TABLE device_shadows DROP COLUMN firmware;
ALTER TABLE device_groups DROP COLUMN query;

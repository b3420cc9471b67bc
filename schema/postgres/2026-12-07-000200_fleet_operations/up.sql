-- Fleet operations: batch jobs with a result per device, device commands with their history,
-- dynamic groups, and the reported firmware of each device for filtering.

-- A dynamic group has a query (JSON: type, tags, metadata, status, firmware) instead of members.
ALTER TABLE device_groups ADD COLUMN query TEXT;

-- The reported shadow's `firmware`, kept beside the document by every save so device filters
-- (dynamic groups, batch jobs, campaigns) can match it with an index.
ALTER TABLE device_shadows ADD COLUMN firmware TEXT;
UPDATE device_shadows SET firmware = document::jsonb #>> '{state,reported,firmware}'
    WHERE jsonb_typeof(document::jsonb #> '{state,reported,firmware}') = 'string';
CREATE INDEX device_shadows_firmware ON device_shadows (tenant_id, firmware);

-- A batch job: the devices it targets are fixed when it is created (job_devices), so a resumed
-- job continues with exactly the devices it had not done.
CREATE TABLE jobs (
    id           TEXT    NOT NULL PRIMARY KEY,
    tenant_id    TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    operation    TEXT    NOT NULL,
    params       TEXT    NOT NULL,
    filter       TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    total        BIGINT  NOT NULL,
    succeeded    BIGINT  NOT NULL DEFAULT 0,
    failed       BIGINT  NOT NULL DEFAULT 0,
    skipped      BIGINT  NOT NULL DEFAULT 0,
    concurrency  BIGINT  NOT NULL,
    rate_per_sec BIGINT  NOT NULL,
    detail       TEXT,
    created_by   TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    started_at   BIGINT,
    finished_at  BIGINT,
    updated_at   BIGINT  NOT NULL
);
CREATE INDEX jobs_tenant ON jobs (tenant_id, created_at);
CREATE INDEX jobs_status ON jobs (status);

-- One row per targeted device: `pending` until done, then its outcome. `secret` holds a sealed
-- new token (rotate_tokens) until the job's creator collects it once.
CREATE TABLE job_devices (
    job_id     TEXT   NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    device_id  TEXT   NOT NULL,
    status     TEXT   NOT NULL,
    result     TEXT,
    secret     TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (job_id, device_id)
);
CREATE INDEX job_devices_status ON job_devices (job_id, status, device_id);

-- Commands sent to devices, with their answers: the per-device command history.
CREATE TABLE device_commands (
    id              TEXT   NOT NULL PRIMARY KEY,
    tenant_id       TEXT   NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    device_id       TEXT   NOT NULL,
    name            TEXT   NOT NULL,
    payload         TEXT   NOT NULL,
    status          TEXT   NOT NULL,
    response        TEXT,
    response_status BIGINT,
    error           TEXT,
    timeout_secs    BIGINT NOT NULL,
    expires_at      BIGINT,
    requested_by    TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT,
    completed_at    BIGINT
);
CREATE INDEX device_commands_device ON device_commands (tenant_id, device_id, created_at);
CREATE INDEX device_commands_status ON device_commands (status, expires_at);

-- Fleet operations: firmware images (the bytes live under the data directory) and OTA campaigns
-- with one row per targeted device. The campaign runner keeps all of its state here, so any node
-- holding the runner's lease can take a campaign over where another left it.
CREATE TABLE firmware (
    id           TEXT   PRIMARY KEY,
    tenant_id    TEXT   NOT NULL REFERENCES tenants (id),
    version      TEXT   NOT NULL,
    -- JSON array of device type names the image fits (empty: any).
    device_types TEXT   NOT NULL,
    notes        TEXT   NOT NULL,
    size         BIGINT NOT NULL,
    sha256       TEXT   NOT NULL,
    -- The signed manifest (JSON text) and its Ed25519 signature (base64).
    manifest     TEXT   NOT NULL,
    signature    TEXT   NOT NULL,
    created_by   TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    UNIQUE (tenant_id, version)
);

CREATE TABLE campaigns (
    id                   TEXT    PRIMARY KEY,
    tenant_id            TEXT    NOT NULL REFERENCES tenants (id),
    name                 TEXT    NOT NULL,
    -- No foreign key: a finished campaign keeps naming an image deleted since. Images are
    -- refused deletion while a running or paused campaign uses them.
    firmware_id          TEXT    NOT NULL,
    firmware_version     TEXT    NOT NULL,
    rollback_firmware_id TEXT,
    -- The campaign this one rolls back, if any.
    rollback_of          TEXT,
    -- Rollout, failure rule, timeout, window and target as given (JSON text).
    spec                 TEXT    NOT NULL,
    -- running, paused, completed, cancelled, aborted
    status               TEXT    NOT NULL,
    stage                INTEGER NOT NULL,
    stages               INTEGER NOT NULL,
    status_reason        TEXT,
    created_by           TEXT    NOT NULL,
    created_at           BIGINT  NOT NULL,
    updated_at           BIGINT  NOT NULL
);
CREATE INDEX campaigns_by_tenant ON campaigns (tenant_id, created_at);
CREATE INDEX campaigns_by_status ON campaigns (status);

CREATE TABLE campaign_devices (
    campaign_id TEXT    NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    device_id   TEXT    NOT NULL,
    tenant_id   TEXT    NOT NULL,
    stage       INTEGER NOT NULL,
    -- pending, notified, in_progress, verifying, succeeded, failed, rejected, timed_out,
    -- cancelled, skipped
    state       TEXT    NOT NULL,
    progress    INTEGER NOT NULL,
    attempts    INTEGER NOT NULL,
    reason      TEXT,
    notified_at BIGINT,
    updated_at  BIGINT  NOT NULL,
    -- JSON array of {at, state, progress?, reason?}, oldest first, capped.
    history     TEXT    NOT NULL,
    PRIMARY KEY (campaign_id, device_id)
);
CREATE INDEX campaign_devices_by_stage ON campaign_devices (campaign_id, stage, state);
CREATE INDEX campaign_devices_by_device ON campaign_devices (tenant_id, device_id, state);

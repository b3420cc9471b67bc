-- Rules engine: rules, named notification channels, alarms with their history and deliveries.

CREATE TABLE rules (
    id          TEXT    NOT NULL PRIMARY KEY,
    tenant_id   TEXT    NOT NULL REFERENCES tenants (id),
    name        TEXT    NOT NULL,
    enabled     BOOLEAN NOT NULL DEFAULT 1,
    -- The validated rule definition as JSON (condition, clear, scope, actions, escalation);
    -- inline secrets are replaced by their AES-256-GCM ciphertext.
    body        TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    UNIQUE (tenant_id, name)
);

CREATE TABLE rule_channels (
    id          TEXT    NOT NULL PRIMARY KEY,
    tenant_id   TEXT    NOT NULL REFERENCES tenants (id),
    name        TEXT    NOT NULL,
    -- 'webhook', 'email' or 'sms'.
    kind        TEXT    NOT NULL,
    -- Settings without the secret, as JSON.
    config      TEXT    NOT NULL,
    -- base64(nonce || AES-256-GCM ciphertext) of the secret (HMAC key, gateway token), or NULL.
    secret      TEXT,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    UNIQUE (tenant_id, name)
);

CREATE TABLE alarms (
    id                  TEXT    NOT NULL PRIMARY KEY,
    tenant_id           TEXT    NOT NULL REFERENCES tenants (id),
    rule_id             TEXT    NOT NULL,
    rule_name           TEXT    NOT NULL,
    device_id           TEXT    NOT NULL,
    severity            TEXT    NOT NULL,
    active              BOOLEAN NOT NULL,
    acknowledged        BOOLEAN NOT NULL,
    count               BIGINT  NOT NULL,
    first_seen          BIGINT  NOT NULL,
    last_seen           BIGINT  NOT NULL,
    acked_at            BIGINT,
    acked_by            TEXT,
    cleared_at          BIGINT,
    cleared_by          TEXT,
    value               DOUBLE PRECISION,
    details             TEXT    NOT NULL,
    -- Escalation: the next step and when it is due (NULL when none is left); survives restarts.
    escalation_step     INTEGER NOT NULL DEFAULT 0,
    next_escalation_at  BIGINT
);
-- One active alarm per (device, rule).
CREATE UNIQUE INDEX alarms_one_active ON alarms (tenant_id, rule_id, device_id) WHERE active = 1;
CREATE INDEX alarms_tenant_seen ON alarms (tenant_id, last_seen);
CREATE INDEX alarms_escalation ON alarms (next_escalation_at);

CREATE TABLE alarm_events (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    alarm_id   TEXT    NOT NULL REFERENCES alarms (id) ON DELETE CASCADE,
    at         BIGINT  NOT NULL,
    -- created, severity, acknowledged, cleared, comment, escalated, suppressed
    kind       TEXT    NOT NULL,
    actor      TEXT,
    message    TEXT    NOT NULL
);
CREATE INDEX alarm_events_alarm ON alarm_events (alarm_id, id);

CREATE TABLE alarm_deliveries (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    alarm_id   TEXT    NOT NULL REFERENCES alarms (id) ON DELETE CASCADE,
    at         BIGINT  NOT NULL,
    channel    TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    step       INTEGER NOT NULL,
    attempts   INTEGER NOT NULL,
    -- 'delivered' or 'failed'
    outcome    TEXT    NOT NULL,
    detail     TEXT    NOT NULL
);
CREATE INDEX alarm_deliveries_alarm ON alarm_deliveries (alarm_id, id);

-- Registry: tenants, users, API keys, devices and their credentials, groups, tags, audit log.
-- Timestamps are milliseconds since the Unix epoch (BIGINT) so SQLite and PostgreSQL share one
-- code path; JSON values are stored as TEXT.

CREATE TABLE tenants (
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    disabled    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);

CREATE TABLE users (
    id              TEXT    NOT NULL PRIMARY KEY,
    tenant_id       TEXT    NOT NULL REFERENCES tenants (id),
    username        TEXT    NOT NULL UNIQUE,
    password_hash   TEXT    NOT NULL,
    role            TEXT    NOT NULL,
    platform_admin  BOOLEAN NOT NULL DEFAULT FALSE,
    disabled        BOOLEAN NOT NULL DEFAULT FALSE,
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL
);
CREATE INDEX users_tenant ON users (tenant_id, username);

CREATE TABLE api_keys (
    id          TEXT    NOT NULL PRIMARY KEY,
    tenant_id   TEXT    NOT NULL REFERENCES tenants (id),
    name        TEXT    NOT NULL,
    role        TEXT    NOT NULL,
    -- SHA-256 of the whole key, hex; the key itself is never stored.
    digest      TEXT    NOT NULL UNIQUE,
    -- First characters of the key, so people can tell keys apart.
    prefix      TEXT    NOT NULL,
    created_by  TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);

CREATE TABLE devices (
    tenant_id    TEXT    NOT NULL REFERENCES tenants (id),
    device_id    TEXT    NOT NULL,
    device_type  TEXT    NOT NULL,
    enabled      BOOLEAN NOT NULL DEFAULT TRUE,
    connected    BOOLEAN NOT NULL DEFAULT FALSE,
    last_seen_at BIGINT,
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL,
    PRIMARY KEY (tenant_id, device_id)
);
CREATE INDEX devices_type ON devices (tenant_id, device_type, device_id);

-- Top-level metadata attributes, one row each, so `metadata.location=…` filters use an index.
CREATE TABLE device_metadata (
    tenant_id  TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    name       TEXT NOT NULL,
    -- JSON text of the value.
    value      TEXT NOT NULL,
    PRIMARY KEY (tenant_id, device_id, name),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
CREATE INDEX device_metadata_lookup ON device_metadata (tenant_id, name, value);

CREATE TABLE device_tags (
    tenant_id  TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    tag        TEXT NOT NULL,
    PRIMARY KEY (tenant_id, device_id, tag),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
CREATE INDEX device_tags_lookup ON device_tags (tenant_id, tag);

CREATE TABLE device_credentials (
    id          TEXT   NOT NULL PRIMARY KEY,
    tenant_id   TEXT   NOT NULL,
    device_id   TEXT   NOT NULL,
    -- 'token' (SHA-256 of the device token) or 'x509' (SHA-256 of the certificate).
    kind        TEXT   NOT NULL,
    digest      TEXT   NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
CREATE INDEX device_credentials_device ON device_credentials (tenant_id, device_id);

CREATE TABLE device_groups (
    tenant_id    TEXT   NOT NULL REFERENCES tenants (id),
    name         TEXT   NOT NULL,
    description  TEXT   NOT NULL DEFAULT '',
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE device_group_members (
    tenant_id   TEXT   NOT NULL,
    group_name  TEXT   NOT NULL,
    device_id   TEXT   NOT NULL,
    added_at    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, group_name, device_id),
    FOREIGN KEY (tenant_id, group_name) REFERENCES device_groups (tenant_id, name) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
CREATE INDEX device_group_members_device ON device_group_members (tenant_id, device_id);

CREATE TABLE audit_log (
    id         BIGSERIAL PRIMARY KEY,
    at         BIGINT  NOT NULL,
    -- NULL when the caller could not be tied to a tenant (bad credentials).
    tenant_id  TEXT,
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    target     TEXT,
    -- 'ok' or 'denied'.
    outcome    TEXT    NOT NULL,
    detail     TEXT,
    source_ip  TEXT
);
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, id);

-- Platform-wide values that must be the same on every node (e.g. the generated JWT key).
CREATE TABLE platform_settings (
    name   TEXT NOT NULL PRIMARY KEY,
    value  TEXT NOT NULL
);

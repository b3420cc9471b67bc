-- MQTT broker: access rules managed through the API, and the CAs that sign device certificates.

-- Rules for applications (by role or by API key) and anonymous clients. Devices follow the
-- built-in rule (only their own devices/{id}/...) and are not subject to these.
CREATE TABLE mqtt_acl_rules (
    id            TEXT    NOT NULL PRIMARY KEY,
    -- NULL for rules about anonymous clients, which live outside every tenant.
    tenant_id     TEXT    REFERENCES tenants (id),
    -- 'role', 'api_key' or 'anonymous'.
    subject_kind  TEXT    NOT NULL,
    -- The role name or API key id; '*' for anonymous.
    subject       TEXT    NOT NULL,
    -- 'publish', 'subscribe' or 'all'.
    action        TEXT    NOT NULL,
    -- A topic filter (wildcards allowed) the rule applies to.
    topic         TEXT    NOT NULL,
    -- 'allow' or 'deny'.
    effect        TEXT    NOT NULL,
    -- Lower first; the first matching rule decides.
    priority      INTEGER NOT NULL DEFAULT 100,
    created_at    BIGINT  NOT NULL
);
CREATE INDEX mqtt_acl_rules_tenant ON mqtt_acl_rules (tenant_id, priority);

-- CAs whose certificates identify a tenant's devices over mTLS (certificate CN = device id).
CREATE TABLE tenant_ca_certificates (
    id           TEXT   NOT NULL PRIMARY KEY,
    tenant_id    TEXT   NOT NULL REFERENCES tenants (id),
    -- SHA-256 of the DER certificate, hex.
    fingerprint  TEXT   NOT NULL,
    subject      TEXT   NOT NULL,
    pem          TEXT   NOT NULL,
    not_after    BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    UNIQUE (tenant_id, fingerprint)
);

-- Which node holds a connected device's session, so a restarting node clears only its own.
ALTER TABLE devices ADD COLUMN connected_node TEXT;

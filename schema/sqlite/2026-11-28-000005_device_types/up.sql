-- Per-device-type telemetry schemas: renames, unit conversions, declared types and ranges.
CREATE TABLE device_types (
    tenant_id   TEXT   NOT NULL REFERENCES tenants (id),
    name        TEXT   NOT NULL,
    -- The DeviceTypeSchema as JSON text.
    definition  TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

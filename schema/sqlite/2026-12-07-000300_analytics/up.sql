-- Live analytics (actors/src/analytics, src/analytics/store.rs).

-- Configuration layers: scope 'tenant' (target ''), 'device_type' (target = the type) or
-- 'device' (target = the device id). A device's settings are the defaults overlaid with its
-- tenant's, its type's and its own layer, field by field.
CREATE TABLE analytics_configs (
    tenant_id  TEXT   NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    scope      TEXT   NOT NULL,
    target     TEXT   NOT NULL,
    config     TEXT   NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, scope, target)
);

-- What a restart keeps of a device's monitor: recent values per metric and the forest's
-- training set and seed (JSON). In the registry, not a node's disk, so a device that moves to
-- another node keeps its models.
CREATE TABLE analytics_models (
    tenant_id  TEXT   NOT NULL,
    device_id  TEXT   NOT NULL,
    snapshot   TEXT   NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);

-- Anomaly and drift events.
CREATE TABLE analytics_events (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    tenant_id  TEXT   NOT NULL,
    device_id  TEXT   NOT NULL,
    at         BIGINT NOT NULL,
    -- 'anomaly' or 'drift'
    kind       TEXT   NOT NULL,
    -- zscore, mad, ewma, ensemble, eif, drift
    method     TEXT   NOT NULL,
    score      DOUBLE NOT NULL,
    statistic  DOUBLE NOT NULL,
    -- JSON array of metric names, most deviating first
    metrics    TEXT   NOT NULL,
    value      DOUBLE,
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
CREATE INDEX analytics_events_device ON analytics_events (tenant_id, device_id, at);
CREATE INDEX analytics_events_at ON analytics_events (tenant_id, at);

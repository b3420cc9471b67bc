-- Device shadows (AWS IoT Device Shadow semantics). The device actor is the only writer; every
-- save is conditional on the version it read (UPDATE ... WHERE version = ?), so two writers
-- can never both win. The document is the JSON of drover_actors::ShadowDocument.
CREATE TABLE device_shadows (
    tenant_id   TEXT   NOT NULL,
    device_id   TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    document    TEXT   NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, device_id),
    -- A save racing the device's deletion fails instead of leaving a shadow a re-registered
    -- device of the same id would inherit.
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);

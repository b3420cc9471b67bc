-- Proof of possession for CA registration: a tenant asks for a code, the operator signs a
-- verification certificate whose CN is that code with the CA's private key, and the CA is
-- registered only with it. One current code per tenant; it expires and serves once.
CREATE TABLE ca_registration_codes (
    tenant_id   TEXT   NOT NULL PRIMARY KEY REFERENCES tenants (id),
    code        TEXT   NOT NULL,
    expires_at  BIGINT NOT NULL
);

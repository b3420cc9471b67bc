-- A device page lists the device's recent audit entries (GET /api/audit?target=…): newest
-- first within one tenant and target, without scanning the tenant's whole log.
CREATE INDEX audit_log_tenant_target ON audit_log (tenant_id, target, id);

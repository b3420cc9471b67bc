DROP INDEX audit_log_tenant_target;

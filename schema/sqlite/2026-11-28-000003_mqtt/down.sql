DROP TABLE tenant_ca_certificates;
DROP TABLE mqtt_acl_rules;
ALTER TABLE devices DROP COLUMN connected_node;

DROP TABLE device_types;

DROP TABLE device_shadows;

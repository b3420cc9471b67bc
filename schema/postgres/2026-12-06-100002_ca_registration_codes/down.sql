DROP TABLE ca_registration_codes;

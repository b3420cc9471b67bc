DROP TABLE campaign_devices;
DROP TABLE campaigns;
DROP TABLE firmware;

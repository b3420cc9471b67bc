DROP TABLE analytics_events;
DROP TABLE analytics_models;
DROP TABLE analytics_configs;

DROP TABLE alarm_deliveries;
DROP TABLE alarm_events;
DROP TABLE alarms;
DROP TABLE rule_channels;
DROP TABLE rules;

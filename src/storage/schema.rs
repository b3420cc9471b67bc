// Diesel table definitions for the registry; they match schema/sqlite and schema/postgres.

diesel::table! {
    tenants (id) {
        id -> Text,
        name -> Text,
        disabled -> Bool,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    users (id) {
        id -> Text,
        tenant_id -> Text,
        username -> Text,
        password_hash -> Text,
        role -> Text,
        platform_admin -> Bool,
        disabled -> Bool,
        created_at -> BigInt,
        updated_at -> BigInt,
        token_generation -> BigInt,
    }
}

diesel::table! {
    api_keys (id) {
        id -> Text,
        tenant_id -> Text,
        name -> Text,
        role -> Text,
        digest -> Text,
        prefix -> Text,
        created_by -> Text,
        created_at -> BigInt,
        expires_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    devices (tenant_id, device_id) {
        tenant_id -> Text,
        device_id -> Text,
        device_type -> Text,
        enabled -> Bool,
        connected -> Bool,
        last_seen_at -> Nullable<BigInt>,
        created_at -> BigInt,
        updated_at -> BigInt,
        connected_node -> Nullable<Text>,
    }
}

diesel::table! {
    device_metadata (tenant_id, device_id, name) {
        tenant_id -> Text,
        device_id -> Text,
        name -> Text,
        value -> Text,
    }
}

diesel::table! {
    device_tags (tenant_id, device_id, tag) {
        tenant_id -> Text,
        device_id -> Text,
        tag -> Text,
    }
}

diesel::table! {
    device_credentials (id) {
        id -> Text,
        tenant_id -> Text,
        device_id -> Text,
        kind -> Text,
        digest -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    device_groups (tenant_id, name) {
        tenant_id -> Text,
        name -> Text,
        description -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
        query -> Nullable<Text>,
    }
}

diesel::table! {
    device_group_members (tenant_id, group_name, device_id) {
        tenant_id -> Text,
        group_name -> Text,
        device_id -> Text,
        added_at -> BigInt,
    }
}

diesel::table! {
    audit_log (id) {
        id -> BigInt,
        at -> BigInt,
        tenant_id -> Nullable<Text>,
        actor -> Text,
        action -> Text,
        target -> Nullable<Text>,
        outcome -> Text,
        detail -> Nullable<Text>,
        source_ip -> Nullable<Text>,
        occurrences -> BigInt,
    }
}

diesel::table! {
    ca_registration_codes (tenant_id) {
        tenant_id -> Text,
        code -> Text,
        expires_at -> BigInt,
    }
}

diesel::table! {
    platform_settings (name) {
        name -> Text,
        value -> Text,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    tenants,
    users,
    api_keys,
    devices,
    device_metadata,
    device_tags,
    device_credentials,
    device_groups,
    device_group_members,
    audit_log,
    platform_settings,
);

diesel::table! {
    mqtt_acl_rules (id) {
        id -> Text,
        tenant_id -> Nullable<Text>,
        subject_kind -> Text,
        subject -> Text,
        action -> Text,
        topic -> Text,
        effect -> Text,
        priority -> Integer,
        created_at -> BigInt,
    }
}

diesel::table! {
    tenant_ca_certificates (id) {
        id -> Text,
        tenant_id -> Text,
        fingerprint -> Text,
        subject -> Text,
        pem -> Text,
        not_after -> BigInt,
        created_at -> BigInt,
    }
}

diesel::table! {
    device_shadows (tenant_id, device_id) {
        tenant_id -> Text,
        device_id -> Text,
        version -> BigInt,
        document -> Text,
        updated_at -> BigInt,
        firmware -> Nullable<Text>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(mqtt_acl_rules, tenants);
diesel::allow_tables_to_appear_in_same_query!(tenant_ca_certificates, tenants);

diesel::table! {
    device_types (tenant_id, name) {
        tenant_id -> Text,
        name -> Text,
        definition -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

// Rules engine (schema/*/2026-11-28-000006_rules).

diesel::table! {
    rules (id) {
        id -> Text,
        tenant_id -> Text,
        name -> Text,
        enabled -> Bool,
        body -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    rule_channels (id) {
        id -> Text,
        tenant_id -> Text,
        name -> Text,
        kind -> Text,
        config -> Text,
        secret -> Nullable<Text>,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    alarms (id) {
        id -> Text,
        tenant_id -> Text,
        rule_id -> Text,
        rule_name -> Text,
        device_id -> Text,
        severity -> Text,
        active -> Bool,
        acknowledged -> Bool,
        count -> BigInt,
        first_seen -> BigInt,
        last_seen -> BigInt,
        acked_at -> Nullable<BigInt>,
        acked_by -> Nullable<Text>,
        cleared_at -> Nullable<BigInt>,
        cleared_by -> Nullable<Text>,
        value -> Nullable<Double>,
        details -> Text,
        escalation_step -> Integer,
        next_escalation_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    alarm_events (id) {
        id -> BigInt,
        alarm_id -> Text,
        at -> BigInt,
        kind -> Text,
        actor -> Nullable<Text>,
        message -> Text,
    }
}

diesel::table! {
    alarm_deliveries (id) {
        id -> BigInt,
        alarm_id -> Text,
        at -> BigInt,
        channel -> Text,
        kind -> Text,
        step -> Integer,
        attempts -> Integer,
        outcome -> Text,
        detail -> Text,
    }
}

diesel::table! {
    analytics_configs (tenant_id, scope, target) {
        tenant_id -> Text,
        scope -> Text,
        target -> Text,
        config -> Text,
        updated_at -> BigInt,
    }
}

diesel::table! {
    analytics_models (tenant_id, device_id) {
        tenant_id -> Text,
        device_id -> Text,
        snapshot -> Text,
        updated_at -> BigInt,
    }
}

diesel::table! {
    analytics_events (id) {
        id -> BigInt,
        tenant_id -> Text,
        device_id -> Text,
        at -> BigInt,
        kind -> Text,
        method -> Text,
        score -> Double,
        statistic -> Double,
        metrics -> Text,
        value -> Nullable<Double>,
    }
}

// Fleet operations: batch jobs, device commands (schema/*/2026-12-07-000200_fleet_operations).

diesel::table! {
    jobs (id) {
        id -> Text,
        tenant_id -> Text,
        operation -> Text,
        params -> Text,
        filter -> Text,
        status -> Text,
        total -> BigInt,
        succeeded -> BigInt,
        failed -> BigInt,
        skipped -> BigInt,
        concurrency -> BigInt,
        rate_per_sec -> BigInt,
        detail -> Nullable<Text>,
        created_by -> Text,
        created_at -> BigInt,
        started_at -> Nullable<BigInt>,
        finished_at -> Nullable<BigInt>,
        updated_at -> BigInt,
    }
}

diesel::table! {
    job_devices (job_id, device_id) {
        job_id -> Text,
        device_id -> Text,
        status -> Text,
        result -> Nullable<Text>,
        secret -> Nullable<Text>,
        updated_at -> BigInt,
    }
}

diesel::table! {
    device_commands (id) {
        id -> Text,
        tenant_id -> Text,
        device_id -> Text,
        name -> Text,
        payload -> Text,
        status -> Text,
        response -> Nullable<Text>,
        response_status -> Nullable<BigInt>,
        error -> Nullable<Text>,
        timeout_secs -> BigInt,
        expires_at -> Nullable<BigInt>,
        requested_by -> Text,
        created_at -> BigInt,
        sent_at -> Nullable<BigInt>,
        completed_at -> Nullable<BigInt>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(jobs, job_devices);
// Device filters match the reported firmware with a subquery on the shadows.
diesel::allow_tables_to_appear_in_same_query!(devices, device_shadows);

// Fleet operations: firmware and OTA campaigns (schema/*/2026-12-07-000100_ota).

diesel::table! {
    firmware (id) {
        id -> Text,
        tenant_id -> Text,
        version -> Text,
        device_types -> Text,
        notes -> Text,
        size -> BigInt,
        sha256 -> Text,
        manifest -> Text,
        signature -> Text,
        created_by -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    campaigns (id) {
        id -> Text,
        tenant_id -> Text,
        name -> Text,
        firmware_id -> Text,
        firmware_version -> Text,
        rollback_firmware_id -> Nullable<Text>,
        rollback_of -> Nullable<Text>,
        spec -> Text,
        status -> Text,
        stage -> Integer,
        stages -> Integer,
        status_reason -> Nullable<Text>,
        created_by -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
        // schema/*/2026-12-07-020000_campaign_pause
        paused_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    campaign_devices (campaign_id, device_id) {
        campaign_id -> Text,
        device_id -> Text,
        tenant_id -> Text,
        stage -> Integer,
        state -> Text,
        progress -> Integer,
        attempts -> Integer,
        reason -> Nullable<Text>,
        notified_at -> Nullable<BigInt>,
        updated_at -> BigInt,
        history -> Text,
        deadline_at -> Nullable<BigInt>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(firmware, campaigns, campaign_devices);

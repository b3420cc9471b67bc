//! The HTTP edge: REST API, operations endpoints and the OpenAPI description.
//!
//! Handlers decode requests into domain types, check the caller, and call the registry or the
//! actor tree; they hold no state of their own.

pub mod accounts;
pub mod alerts;
pub mod analytics;
pub mod campaigns;
pub mod cluster;
pub mod commands;
pub mod device_types;
pub mod devices;
pub mod error;
pub mod firmware;
pub mod groups;
pub mod ingest;
pub mod jobs;
pub mod mqtt;
pub mod ops;
pub mod params;
pub mod principal;
pub mod rules;
pub mod shadow;
pub mod telemetry;
pub mod tenants;
pub mod ws;

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{App, HttpRequest, HttpResponse, web};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_actix_web::{AppExt, scope};

use crate::http::error::ApiError;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Drover API",
        description = "IoT device management: registry, auth, telemetry, rules and operations. \
                       Authenticate with `Authorization: Bearer <login token or API key>`.",
        license(name = "MIT")
    ),
    modifiers(&BearerAuth),
    // What a platform admin gets from /health (the path declares what everyone gets).
    components(schemas(crate::health::HealthReport)),
    tags(
        (name = "auth", description = "Logins"),
        (name = "devices", description = "Device registry"),
        (name = "groups", description = "Device groups"),
        (name = "users", description = "Users of a tenant"),
        (name = "keys", description = "API keys for applications"),
        (name = "tenants", description = "Tenants (platform admins)"),
        (name = "telemetry", description = "Telemetry queries"),
        (name = "audit", description = "Audit log"),
        (name = "mqtt", description = "MQTT access rules and device CAs"),
        (name = "operations", description = "Health, metrics, statistics"),
        (name = "rules", description = "Rules and notification channels"),
        (name = "alerts", description = "Alarms and the live stream"),
        (name = "analytics", description = "Anomaly detection, forecasts, statistics, trend, drift, correlation"),
        (name = "jobs", description = "Batch operations as jobs"),
        (name = "commands", description = "Commands to devices, with their answers"),
        (name = "firmware", description = "Firmware registry (OTA images)"),
        (name = "campaigns", description = "OTA campaigns: staged firmware rollouts"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("login token (JWT) or API key"))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as served, built from the same services the app registers.
pub struct OpenApiJson(pub String);

/// The application with every route, shared by the server and the tests.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    // One body limit for JSON, raw (`web::Bytes`, shadow updates) and streamed bodies.
    let body_limit = state.config.http.max_body_bytes;
    let json = web::JsonConfig::default()
        .limit(body_limit)
        .content_type_required(false)
        .error_handler(error::json_error);
    let (app, api) = App::new()
        .app_data(state)
        .app_data(json)
        .app_data(web::QueryConfig::default().error_handler(error::query_error))
        .app_data(web::PathConfig::default().error_handler(error::path_error))
        .app_data(web::PayloadConfig::new(body_limit))
        .wrap_fn(|req, srv| {
            use actix_web::ResponseError;
            use actix_web::dev::Service;
            use futures_util::FutureExt;
            use futures_util::future::{Either, ready};
            // One check for every endpoint, whether it reads its body typed, raw or streamed.
            match params::refuse_non_json_body(req.request()) {
                Err(refused) => {
                    Either::Left(ready(Ok(req.into_response(refused.error_response()).map_into_right_body())))
                }
                Ok(()) => Either::Right(srv.call(req).map(|res| res.map(ServiceResponse::map_into_left_body))),
            }
        })
        .wrap(actix_web::middleware::ErrorHandlers::new().default_handler(error::json_error_response))
        .wrap_fn(|req, srv| {
            use actix_web::dev::Service;
            let start = Instant::now();
            let method = crate::metrics::method_label(req.method());
            let state = req.app_data::<web::Data<AppState>>().cloned();
            let fut = srv.call(req);
            async move {
                let result = fut.await;
                if let Some(state) = state {
                    let (route, status) = match &result {
                        Ok(res) => (res.request().match_pattern().unwrap_or_else(|| "unmatched".into()), res.status()),
                        Err(e) => ("unmatched".into(), e.as_response_error().status_code()),
                    };
                    state.metrics.http_requests.with_label_values(&[method, &route, status.as_str()]).inc();
                    state.metrics.http_duration.with_label_values(&[method, &route]).observe(start.elapsed().as_secs_f64());
                    if status.is_server_error() {
                        tracing::warn!(%method, %route, status = status.as_u16(), "request failed");
                    } else {
                        tracing::debug!(%method, %route, status = status.as_u16(), elapsed_ms = start.elapsed().as_secs_f64() * 1e3, "request");
                    }
                }
                result
            }
        })
        .into_utoipa_app()
        .openapi(ApiDoc::openapi())
        .service(
            scope::scope("/api")
                .configure(accounts::routes)
                .configure(devices::routes)
                .configure(shadow::routes)
                .configure(groups::routes)
                .configure(tenants::routes)
                .configure(mqtt::routes)
                .configure(telemetry::routes)
                .configure(ingest::routes)
                .configure(device_types::routes)
                .configure(rules::routes)
                .configure(alerts::routes)
                .configure(analytics::routes)
                .configure(jobs::routes)
                .configure(commands::routes)
                .configure(firmware::routes)
                .configure(campaigns::routes)
                // Served from the document built below; inside the scope, which owns every /api path.
                .route("/openapi.json", web::get().to(openapi_json))
                // `/api` itself (the start banner's link) answers the index of the API.
                .route("", web::get().to(index)),
        )
        .service(ops::health)
        .service(ops::metrics)
        .service(ops::stats)
        .service(ops::busiest_devices)
        .service(ops::actors)
        .service(ops::device_actor)
        .service(cluster::cluster)
        .service(ws::live)
        .service(ingest::device_socket)
        .split_for_parts();
    let document = OpenApiJson(api.to_json().unwrap_or_else(|_| "{}".into()));
    app.app_data(web::Data::new(document))
        .configure(crate::dashboard::console::routes)
        .default_service(web::to(not_found))
}

async fn openapi_json(document: web::Data<OpenApiJson>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document.0.clone())
}

async fn index() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "name": "drover",
        "version": env!("CARGO_PKG_VERSION"),
        "api": "/api/openapi.json",
        "console": "/",
        "health": "/health",
        "metrics": "/metrics",
    }))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    ApiError::not_found(format!("no route for {} {}", req.method(), req.path())).error_response()
}

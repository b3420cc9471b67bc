//! `GET /admin/cluster`: the nodes of this node's cluster, as Redis knows them.

use actix_web::{HttpResponse, get, web};

use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::Principal;
use crate::state::AppState;

/// The cluster's nodes (address, connections, sessions, owned devices, heartbeat age, health)
/// and this node's view of routes and Redis (platform admins). A single node answers
/// `{"cluster": null}`.
#[utoipa::path(
    tag = "operations",
    responses((status = 200, description = "Nodes of the cluster", body = Object), (status = 403, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/admin/cluster")]
pub async fn cluster(state: web::Data<AppState>, principal: Principal) -> Result<HttpResponse, ApiError> {
    principal.require_platform_admin("admin.cluster")?;
    Ok(match state.mqtt.cluster.get() {
        Some(cluster) => HttpResponse::Ok().json(cluster.describe()),
        None => HttpResponse::Ok().json(serde_json::json!({ "cluster": null, "nodes": [] })),
    })
}

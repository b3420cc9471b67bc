//! `GET /admin/cluster`: the nodes of this node's cluster, as Redis knows them.

use actix_web::{HttpResponse, get, web};

use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::Principal;
use crate::state::AppState;

/// The cluster's nodes (address, connections, sessions, owned devices, heartbeat age, health)
/// and this node's view of routes, Redis and the tenants' group and absence rules (which
/// tenants' it judges, who judges the others'; platform admins). A single node answers
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
        Some(cluster) => {
            let mut body = cluster.describe();
            if let Some(spanning) = &state.rules.spanning {
                body["spanningRules"] = spanning.describe();
            }
            HttpResponse::Ok().json(body)
        }
        None => HttpResponse::Ok().json(serde_json::json!({ "cluster": null, "nodes": [] })),
    })
}

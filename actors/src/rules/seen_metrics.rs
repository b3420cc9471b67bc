//! The metric names each tenant's devices have reported since the server started, so that a
//! rule naming a metric nobody reports (`temprature > 30`) can be answered with a warning when
//! it is created. Kept in memory, fed by the rule router with every accepted batch, and bounded:
//! past [`MAX_NAMES_PER_TENANT`] names a tenant's list is marked incomplete and no longer grows
//! (a name missing from an incomplete list proves nothing).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::RwLock;

use crate::ids::TenantId;

/// Names remembered per tenant.
pub const MAX_NAMES_PER_TENANT: usize = 1024;

/// What a tenant's devices have reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportedMetrics {
    pub names: BTreeSet<String>,
    /// `false` when the tenant reported more names than are kept.
    pub complete: bool,
}

#[derive(Debug, Default)]
struct TenantNames {
    names: HashSet<String>,
    complete: bool,
}

/// Metric names reported per tenant (shared by the rule router and the API).
#[derive(Debug, Default)]
pub struct SeenMetrics {
    tenants: RwLock<HashMap<TenantId, TenantNames>>,
}

impl SeenMetrics {
    /// Records the names of a batch. Most batches repeat known names: they only take the read
    /// lock.
    pub fn observe<'a>(&self, tenant: &TenantId, names: impl Iterator<Item = &'a str> + Clone) {
        {
            let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
            if let Some(known) = tenants.get(tenant)
                && (!known.complete || names.clone().all(|n| known.names.contains(n)))
            {
                return;
            }
        }
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        let known = tenants.entry(tenant.clone()).or_insert_with(|| TenantNames {
            names: HashSet::new(),
            complete: true,
        });
        for name in names {
            if !known.complete {
                break;
            }
            if known.names.contains(name) {
                continue;
            }
            if known.names.len() >= MAX_NAMES_PER_TENANT {
                known.complete = false;
            } else {
                known.names.insert(name.to_string());
            }
        }
    }

    /// What `tenant`'s devices have reported so far.
    pub fn reported(&self, tenant: &TenantId) -> ReportedMetrics {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        tenants.get(tenant).map_or(
            ReportedMetrics {
                names: BTreeSet::new(),
                complete: true,
            },
            |known| ReportedMetrics {
                names: known.names.iter().cloned().collect(),
                complete: known.complete,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_per_tenant_and_bounded() {
        let seen = SeenMetrics::default();
        let (a, b) = (TenantId::parse("a").unwrap(), TenantId::parse("b").unwrap());
        assert_eq!(
            seen.reported(&a),
            ReportedMetrics {
                names: BTreeSet::new(),
                complete: true
            }
        );
        seen.observe(&a, ["temperature", "humidity", "temperature"].into_iter());
        seen.observe(&b, ["door"].into_iter());
        let reported = seen.reported(&a);
        assert!(reported.complete);
        assert_eq!(
            reported.names.into_iter().collect::<Vec<_>>(),
            vec!["humidity", "temperature"]
        );
        let names: Vec<String> = (0..MAX_NAMES_PER_TENANT + 10).map(|i| format!("m{i}")).collect();
        seen.observe(&b, names.iter().map(String::as_str));
        let reported = seen.reported(&b);
        assert!(!reported.complete);
        assert_eq!(reported.names.len(), MAX_NAMES_PER_TENANT);
    }
}

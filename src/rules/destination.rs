//! Where notifications may be sent: the address policy that keeps a tenant's webhook from
//! reaching the server's own ports, the cloud metadata service or the operator's private
//! network (server-side request forgery).
//!
//! By default only public unicast addresses are allowed. The operator opens what a deployment
//! needs with `rules.notify_allowed_networks` (`NOTIFY_ALLOWED_NETWORKS`): CIDRs (`10.0.0.0/8`),
//! single addresses, or host names whose every address is then allowed. The decision is made on
//! the address actually connected to: [`VettedResolver`] resolves names itself and hands the HTTP
//! client only the addresses that pass, so a name that resolves to a public address when the
//! channel is created and to 127.0.0.1 when the alarm fires (DNS rebinding) is still refused.
//! Literal addresses never reach a resolver, so the notifier checks them with
//! [`DestinationPolicy::allows_ip`] before connecting, and the API refuses them when a rule or
//! channel is written. Adapter half: the HTTP client lives in [`super::notifier`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why `NOTIFY_ALLOWED_NETWORKS` was refused at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("{0:?} is neither a CIDR (10.0.0.0/8), an IP address nor a host name")]
    InvalidEntry(String),
}

/// The destination refused by the policy; found in a failed request's error chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination not allowed")]
pub struct DestinationNotAllowed;

/// The operator's allow-list on top of the default (public unicast addresses only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationPolicy {
    networks: Vec<IpNet>,
    /// Lowercase, without a trailing dot.
    hosts: Vec<String>,
}

impl DestinationPolicy {
    /// Parses the allow-list entries (each a CIDR, an address or a host name; blanks ignored).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<DestinationPolicy, DestinationError> {
        let mut policy = DestinationPolicy::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            if let Ok(net) = entry.parse::<IpNet>() {
                policy.networks.push(net.trunc());
            } else if let Ok(ip) = entry
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                policy.networks.push(IpNet::from(ip));
            } else if is_host_name(entry) {
                policy.hosts.push(normalize_host(entry));
            } else {
                return Err(DestinationError::InvalidEntry(entry.to_string()));
            }
        }
        Ok(policy)
    }

    /// Whether a connection to `ip` is allowed: a public unicast address, or one inside an
    /// allowed network. An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        is_public(ip) || self.networks.iter().any(|net| net.contains(&ip))
    }

    /// Whether `host` (a name, not an address) is allowed whatever it resolves to.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.hosts.contains(&host)
    }

    /// Whether a URL's host may be connected to as far as can be told without resolving it: a
    /// literal address must be allowed; a name is judged on its addresses at delivery.
    pub fn allows_url(&self, url: &reqwest::Url) -> bool {
        literal_address(url).is_none_or(|ip| self.allows_ip(ip))
    }
}

/// The address a URL names literally (`http://127.0.0.1/`, `http://[::1]/`, and the other
/// spellings the URL parser normalizes to an address, such as `http://2130706433/`).
pub fn literal_address(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn is_host_name(entry: &str) -> bool {
    let name = entry.trim_end_matches('.');
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) reaches the IPv4 host: judge it as such.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// A globally reachable unicast address: not loopback, private, shared (CGNAT), link-local,
/// unique-local, multicast, broadcast, unspecified, or another reserved range.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || a == 0 // "this network", 0.0.0.0/8
        || ip.is_loopback()
        || ip.is_private()
        || (a == 100 && (64..128).contains(&b)) // shared address space, 100.64.0.0/10
        || ip.is_link_local() // 169.254.0.0/16, the cloud metadata service
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments, 192.0.0.0/24
        || (a == 198 && (b == 18 || b == 19)) // benchmarking, 198.18.0.0/15
        || ip.is_multicast()
        || a >= 240) // reserved and broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = Ipv4Addr::from((u32::from(segments[6]) << 16) | u32::from(segments[7]));
        return is_public_v4(v4);
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (segments[0] & 0xffc0) == 0xfe80 // link-local, fe80::/10
        || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated), fec0::/10
        || segments[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (deprecated), ::/96
        || segments[0] == 0x100 && segments[1..4] == [0, 0, 0] // discard-only, 100::/64
        || (segments[0] == 0x2001 && segments[1] == 0xdb8)) // documentation, 2001:db8::/32
}

/// A DNS resolver for the notification client that returns only addresses the policy allows,
/// and fails with [`DestinationNotAllowed`] when none is left.
#[derive(Debug, Clone)]
pub struct VettedResolver {
    policy: Arc<DestinationPolicy>,
}

impl VettedResolver {
    pub fn new(policy: Arc<DestinationPolicy>) -> VettedResolver {
        VettedResolver { policy }
    }
}

impl Resolve for VettedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let named = policy.allows_host(&host);
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| named || policy.allows_ip(addr.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(DestinationNotAllowed) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Whether `error` (or anything it was caused by) is a refusal by the policy.
pub fn is_not_allowed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<DestinationNotAllowed>().is_some() {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_public_unicast_is_allowed_by_default() {
        let policy = DestinationPolicy::default();
        for refused in [
            "127.0.0.1",
            "127.8.9.10",
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.0.170",
            "198.18.0.1",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "2001:db8::1",
        ] {
            assert!(!policy.allows_ip(ip(refused)), "{refused} must be refused");
        }
        for allowed in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "::ffff:93.184.216.34",
            "64:ff9b::808:808",
        ] {
            assert!(policy.allows_ip(ip(allowed)), "{allowed} must be allowed");
        }
    }

    #[test]
    fn the_allow_list_opens_networks_and_hosts() {
        let policy = DestinationPolicy::parse(&[
            "127.0.0.1",
            " 10.0.0.0/8 ",
            "fd00::/8",
            "[::1]",
            "Gateway.Internal.",
            "",
        ])
        .unwrap();
        assert!(policy.allows_ip(ip("127.0.0.1")));
        assert!(
            policy.allows_ip(ip("::ffff:127.0.0.1")),
            "mapped like the IPv4 address"
        );
        assert!(!policy.allows_ip(ip("127.0.0.2")));
        assert!(policy.allows_ip(ip("10.200.0.1")));
        assert!(!policy.allows_ip(ip("192.168.0.1")));
        assert!(policy.allows_ip(ip("fd00::5")));
        assert!(policy.allows_ip(ip("::1")));
        assert!(policy.allows_host("gateway.internal"));
        assert!(!policy.allows_host("other.internal"));
        // A host bits set in a CIDR still names its network.
        let policy = DestinationPolicy::parse(&["192.168.1.7/24"]).unwrap();
        assert!(policy.allows_ip(ip("192.168.1.200")));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["10.0.0.0/33", "http://x", "a b", "-x.example", "10.0.0.1/"] {
            assert!(DestinationPolicy::parse(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn literal_hosts_are_judged_by_address() {
        let policy = DestinationPolicy::default();
        let host = |url: &str| reqwest::Url::parse(url).unwrap();
        for url in [
            "http://127.0.0.1:8080/",
            "http://[::1]/",
            "http://0.0.0.0/",
            "http://169.254.169.254/latest/meta-data/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::ffff:7f00:1]/",
        ] {
            assert!(!policy.allows_url(&host(url)), "{url}");
        }
        for url in [
            "https://hooks.example.com/x",
            "http://localhost:1/",
            "http://93.184.216.34/",
        ] {
            assert!(policy.allows_url(&host(url)), "{url}");
        }
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        let refused = VettedResolver::new(Arc::new(DestinationPolicy::default()));
        let error = match refused.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(error) => error,
        };
        assert!(is_not_allowed(error.as_ref()));
        let opened = VettedResolver::new(Arc::new(DestinationPolicy::parse(&["127.0.0.0/8"]).unwrap()));
        let addrs: Vec<SocketAddr> = opened
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty());
        assert!(
            addrs.iter().all(|a| a.ip().is_loopback() && a.is_ipv4()),
            "{addrs:?}"
        );
        let by_name = VettedResolver::new(Arc::new(DestinationPolicy::parse(&["LOCALHOST"]).unwrap()));
        assert!(by_name.resolve("localhost".parse().unwrap()).await.is_ok());
    }

    #[tokio::test]
    async fn a_client_connects_through_the_resolver_to_allowed_addresses_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                // A GET without a body fits one read.
                let _ = stream.read(&mut [0u8; 4096]).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                    .await;
            }
        });
        let client = |policy: DestinationPolicy| {
            reqwest::Client::builder()
                .no_proxy()
                .dns_resolver(Arc::new(VettedResolver::new(Arc::new(policy))))
                .build()
                .unwrap()
        };
        let url = format!("http://localhost:{port}/");
        // Only the IPv4 loopback is opened: an IPv6 answer for localhost is dropped, not tried.
        let opened = client(DestinationPolicy::parse(&["127.0.0.1"]).unwrap());
        let response = opened.get(&url).send().await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::NO_CONTENT);
        let refused = client(DestinationPolicy::default());
        let error = refused.get(&url).send().await.unwrap_err();
        assert!(is_not_allowed(&error), "{error:?}");
    }
}

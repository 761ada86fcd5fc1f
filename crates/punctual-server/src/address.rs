//! Which addresses a webhook may reach, and which headers a task may set on its request.
//!
//! A task's webhook URL comes from whoever may schedule tasks; without these rules it could make the
//! server POST to cloud metadata services (`169.254.169.254`), to the local Redis (`localhost:6379`)
//! or to anything else on the server's private network. Private, loopback, link-local, unique-local,
//! CGNAT, multicast and unspecified addresses are refused unless a setting allows them: literal IPs
//! (in any spelling the URL parser accepts, such as `0x7f000001` or `2130706433`) when the task is
//! scheduled, and host names where they resolve, at delivery, so a name cannot be re-pointed later.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// One entry of `--webhook-allow`: a network or a host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    Net(ipnet::IpNet),
    /// A host name, lower-case; `.example.internal` also matches every subdomain.
    Host(String),
}

impl AllowEntry {
    /// `10.1.0.0/16`, `::1/128`, `10.0.0.5` (one address), `hooks.internal` or `.internal`.
    pub fn parse(text: &str) -> Result<AllowEntry, String> {
        let text = text.trim();
        if let Ok(net) = text.parse::<ipnet::IpNet>() {
            return Ok(AllowEntry::Net(net));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(AllowEntry::Net(ipnet::IpNet::from(ip)));
        }
        let host = text.to_ascii_lowercase();
        let valid = !host.trim_start_matches('.').is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if valid {
            Ok(AllowEntry::Host(host))
        } else {
            Err(format!(
                "{text:?} is neither a CIDR (10.0.0.0/8), an address nor a host name"
            ))
        }
    }
}

/// The address rules of one server.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Allow every address (`--webhook-allow-private`).
    pub allow_private: bool,
    pub allow: Vec<AllowEntry>,
}

/// How to allow what was refused, for every refusal.
const HOW_TO_ALLOW: &str = "to allow it, start the server with --webhook-allow-private (any \
                            address) or --webhook-allow with its network or host name";

impl AddressPolicy {
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow.iter().any(|entry| match entry {
            AllowEntry::Host(h) if h.starts_with('.') => {
                host.ends_with(h.as_str()) || host == h[1..]
            }
            AllowEntry::Host(h) => *h == host,
            AllowEntry::Net(_) => false,
        })
    }

    fn ip_allowed(&self, ip: IpAddr) -> bool {
        self.allow_private
            || !is_internal(ip)
            || self.allow.iter().any(|entry| match entry {
                AllowEntry::Net(net) => net.contains(&ip),
                AllowEntry::Host(_) => false,
            })
    }

    /// Checks a webhook URL's host as written: a literal address must be allowed, and so must names
    /// that only ever mean this machine (`localhost`) or a cloud metadata service. Other names are
    /// checked where they resolve, at delivery.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("webhook.url: {e}"))?;
        match parsed.host() {
            None => Err("webhook.url has no host".into()),
            Some(url::Host::Ipv4(ip)) => self.check_ip(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(&ip.to_string(), IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => {
                let lower = name.trim_end_matches('.').to_ascii_lowercase();
                let internal_name = lower == "localhost"
                    || lower.ends_with(".localhost")
                    || lower == "metadata.google.internal"
                    || lower == "metadata";
                if internal_name && !self.allow_private && !self.host_allowed(&lower) {
                    return Err(format!(
                        "webhook.url host {name:?} is this machine or a metadata service; \
                         {HOW_TO_ALLOW}"
                    ));
                }
                Ok(())
            }
        }
    }

    fn check_ip(&self, shown: &str, ip: IpAddr) -> Result<(), String> {
        if self.ip_allowed(ip) {
            Ok(())
        } else {
            Err(format!(
                "webhook.url address {shown} is private, loopback or link-local; {HOW_TO_ALLOW}"
            ))
        }
    }

    /// The addresses `host` may be reached at, of those it resolved to; an error naming them when
    /// none may be.
    pub fn filter(&self, host: &str, resolved: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
        if self.allow_private || self.host_allowed(host) {
            return Ok(resolved);
        }
        let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
            .into_iter()
            .partition(|addr| self.ip_allowed(addr.ip()));
        if allowed.is_empty() {
            let shown: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
            return Err(format!(
                "webhook host {host:?} resolves only to private addresses ({}); {HOW_TO_ALLOW}",
                shown.join(", ")
            ));
        }
        Ok(allowed)
    }
}

/// Whether `ip` is an address a webhook should not reach by default.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let segments = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 = Ipv4Addr::from(((segments[6] as u32) << 16) | segments[7] as u32);
                return internal_v4(v4);
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (segments[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (segments[0] & 0xffc0) == 0xfe80 // link local fe80::/10
                || (segments[0] & 0xffc0) == 0xfec0 // site local (deprecated) fec0::/10
                || v6 == Ipv6Addr::from([0u8; 16])
        }
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
}

/// Request headers a task may not set: hop-by-hop headers and those that frame the request (a
/// `content-length: 0` would send an empty body while the delivery counts as succeeded), `host`, and
/// Punctual's own (`punctual-*`, so a task cannot forge a signature).
pub fn refused_header(name: &str) -> bool {
    const REFUSED: [&str; 12] = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "expect",
    ];
    let lower = name.to_ascii_lowercase();
    REFUSED.contains(&lower.as_str()) || lower.starts_with("punctual-")
}

/// reqwest's resolver with the address rules applied: every connection a webhook makes, whatever
/// the name, goes through it.
pub struct GuardedResolver {
    pub policy: Arc<AddressPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = policy.filter(&host, resolved).map_err(|message| {
                Box::new(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    message,
                )) as Box<dyn std::error::Error + Send + Sync>
            })?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AddressPolicy {
        AddressPolicy::default()
    }

    #[test]
    fn internal_literals_are_refused_in_every_spelling() {
        for url in [
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://localhost:6379/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://app.localhost/",
        ] {
            let error = policy().check_url(url).unwrap_err();
            assert!(error.contains("--webhook-allow-private"), "{url}: {error}");
        }
        for url in [
            "https://example.com/hook",
            "http://93.184.216.34/",
            "http://[2606:4700::1]/",
        ] {
            assert_eq!(policy().check_url(url), Ok(()), "{url}");
        }
    }

    #[test]
    fn settings_allow_what_they_name() {
        let all = AddressPolicy {
            allow_private: true,
            allow: vec![],
        };
        assert_eq!(all.check_url("http://127.0.0.1:9/"), Ok(()));
        let some = AddressPolicy {
            allow_private: false,
            allow: vec![
                AllowEntry::parse("10.1.0.0/16").unwrap(),
                AllowEntry::parse("::1").unwrap(),
                AllowEntry::parse(".hooks.internal").unwrap(),
                AllowEntry::parse("localhost").unwrap(),
            ],
        };
        assert_eq!(some.check_url("http://10.1.2.3/"), Ok(()));
        assert!(some.check_url("http://10.2.0.1/").is_err());
        assert_eq!(some.check_url("http://[::1]:8080/"), Ok(()));
        assert_eq!(some.check_url("http://localhost:8080/"), Ok(()));
        let private = vec!["10.9.9.9:80".parse().unwrap()];
        assert!(some.filter("a.hooks.internal", private.clone()).is_ok());
        assert!(some.filter("hooks.internal", private.clone()).is_ok());
        let error = some.filter("evil.example", private).unwrap_err();
        assert!(
            error.contains("10.9.9.9") && error.contains("--webhook-allow"),
            "{error}"
        );
        let mixed = vec![
            "10.9.9.9:80".parse().unwrap(),
            "93.184.216.34:80".parse().unwrap(),
        ];
        assert_eq!(some.filter("x.example", mixed).unwrap().len(), 1);
        assert!(AllowEntry::parse("not a host!").is_err());
    }

    /// A name is checked where it resolves, at delivery: `localhost` resolves to loopback.
    #[tokio::test]
    async fn the_resolver_refuses_names_of_private_addresses() {
        use reqwest::dns::Resolve;
        use std::str::FromStr;
        let strict = GuardedResolver {
            policy: Arc::new(AddressPolicy::default()),
        };
        let name = reqwest::dns::Name::from_str("localhost").unwrap();
        let error = match strict.resolve(name).await {
            Ok(_) => panic!("localhost resolved"),
            Err(error) => error.to_string(),
        };
        assert!(
            error.contains("resolves only to private addresses"),
            "{error}"
        );
        let open = GuardedResolver {
            policy: Arc::new(AddressPolicy {
                allow_private: true,
                allow: vec![],
            }),
        };
        let name = reqwest::dns::Name::from_str("localhost").unwrap();
        assert!(open.resolve(name).await.is_ok());
    }

    #[test]
    fn framing_and_own_headers_are_refused() {
        for name in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "connection",
            "punctual-signature",
        ] {
            assert!(refused_header(name), "{name}");
        }
        for name in ["x-api-key", "authorization", "content-type"] {
            assert!(!refused_header(name), "{name}");
        }
    }
}

//! Where mail for a domain goes: MX resolution per RFC 5321 §5.1 and RFC 7505 (null MX), with
//! hickory-resolver (its cache honours record TTLs).

use crate::config::DnsConfig;
use crate::metrics::METRICS;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use rand::seq::SliceRandom;
use std::net::IpAddr;
use std::time::Instant;

/// Why a domain or host cannot be reached through DNS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsFailure {
    /// The domain says it takes no mail (RFC 7505).
    #[error("5.1.10 {0} does not accept mail (null MX, RFC 7505)")]
    NullMx(String),
    /// NXDOMAIN: the name does not exist.
    #[error("5.1.2 {0}: domain not found (NXDOMAIN)")]
    NoSuchDomain(String),
    /// Exists but has no usable address (and, for a domain, no MX).
    #[error("5.1.2 {0}: no MX and no address records")]
    NoAddress(String),
    /// SERVFAIL, timeout, unreachable server...: try again later, never bounce for it.
    #[error("4.4.3 DNS lookup for {name} failed temporarily: {why}")]
    Temporary { name: String, why: String },
}

impl DnsFailure {
    pub fn is_permanent(&self) -> bool {
        !matches!(self, DnsFailure::Temporary { .. })
    }
}

/// One MX host, in the order to try it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    pub name: String,
    pub preference: u16,
}

/// Sorts MX records by preference and shuffles those of equal preference (RFC 5321 §5.1), and
/// recognises the null MX (RFC 7505 §3: a single record with exchange ".").
pub fn order_mx(domain: &str, mut records: Vec<MxHost>) -> Result<Vec<MxHost>, DnsFailure> {
    if records.len() == 1 && (records[0].name.is_empty() || records[0].name == ".") {
        return Err(DnsFailure::NullMx(domain.to_string()));
    }
    // A null MX mixed with real ones is a misconfiguration; the real ones are used.
    records.retain(|m| !m.name.is_empty() && m.name != ".");
    records.shuffle(&mut rand::rng());
    records.sort_by_key(|m| m.preference);
    Ok(records)
}

#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

impl Resolver {
    /// The system resolver (`/etc/resolv.conf`), or the configured nameservers.
    pub fn new(cfg: &DnsConfig) -> Result<Resolver, NetError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if cfg.nameservers.is_empty() {
            match TokioResolver::builder(provider.clone()) {
                Ok(b) => b,
                Err(e) => {
                    // A host without a usable /etc/resolv.conf still runs (local mail works);
                    // remote mail is deferred until DNS works or [dns] names servers.
                    tracing::error!(error = %e, "cannot read the system DNS configuration; using 127.0.0.1:53");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(vec![NameServerConfig::udp_and_tcp(
                            std::net::Ipv4Addr::LOCALHOST.into(),
                        )]),
                        provider,
                    )
                }
            }
        } else {
            let servers = cfg
                .nameservers
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    NameServerConfig::new(a.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let o = builder.options_mut();
        o.timeout = cfg.timeout;
        o.attempts = 2;
        o.ndots = 0;
        Ok(Resolver {
            inner: builder.build()?,
        })
    }

    /// The MX hosts of `domain`, in order; the domain itself when it has no MX (implicit MX,
    /// RFC 5321 §5.1).
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<MxHost>, DnsFailure> {
        let started = Instant::now();
        let r = self.inner.mx_lookup(fqdn(domain)).await;
        METRICS
            .dns_lookup_seconds
            .with_label_values(&["MX"])
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(lookup) => {
                let records: Vec<MxHost> = lookup
                    .answers()
                    .iter()
                    .filter_map(|rec| match &rec.data {
                        RData::MX(mx) => Some(MxHost {
                            name: mx.exchange.to_ascii().trim_end_matches('.').to_string(),
                            preference: mx.preference,
                        }),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    return Ok(vec![MxHost {
                        name: domain.to_string(),
                        preference: 0,
                    }]);
                }
                order_mx(domain, records)
            }
            Err(e) if e.is_nx_domain() => Err(DnsFailure::NoSuchDomain(domain.to_string())),
            // NODATA: the domain exists without MX; its own addresses are the implicit MX.
            Err(e) if e.is_no_records_found() => Ok(vec![MxHost {
                name: domain.to_string(),
                preference: 0,
            }]),
            Err(e) => Err(DnsFailure::Temporary {
                name: domain.to_string(),
                why: e.to_string(),
            }),
        }
    }

    /// A host's addresses, IPv6 first then IPv4 (each tried in turn by the caller). An IP
    /// literal is returned as is.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![ip]);
        }
        let name = fqdn(host);
        let started = Instant::now();
        let (v6, v4) = tokio::join!(
            self.inner.ipv6_lookup(name.clone()),
            self.inner.ipv4_lookup(name)
        );
        METRICS
            .dns_lookup_seconds
            .with_label_values(&["A/AAAA"])
            .observe(started.elapsed().as_secs_f64());
        let mut out = Vec::new();
        let mut temp = None;
        let mut nx = false;
        for r in [v6, v4] {
            match r {
                Ok(l) => out.extend(l.answers().iter().filter_map(|rec| match &rec.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })),
                Err(e) if e.is_nx_domain() => nx = true,
                Err(e) if e.is_no_records_found() => {}
                Err(e) => temp = Some(e.to_string()),
            }
        }
        if !out.is_empty() {
            return Ok(out);
        }
        if let Some(why) = temp {
            return Err(DnsFailure::Temporary {
                name: host.to_string(),
                why,
            });
        }
        if nx {
            Err(DnsFailure::NoSuchDomain(host.to_string()))
        } else {
            Err(DnsFailure::NoAddress(host.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(name: &str, preference: u16) -> MxHost {
        MxHost {
            name: name.into(),
            preference,
        }
    }

    #[test]
    fn null_mx_is_permanent() {
        assert_eq!(
            order_mx("x.example", vec![mx(".", 0)]),
            Err(DnsFailure::NullMx("x.example".into()))
        );
        assert_eq!(
            order_mx("x.example", vec![mx("", 0)]),
            Err(DnsFailure::NullMx("x.example".into()))
        );
        assert!(
            DnsFailure::NullMx("x".into())
                .to_string()
                .starts_with("5.1.10 ")
        );
    }

    #[test]
    fn preference_order_with_shuffled_ties() {
        let mut seen_first = std::collections::HashSet::new();
        for _ in 0..200 {
            let o = order_mx(
                "x",
                vec![mx("c", 20), mx("a1", 10), mx("a2", 10), mx("z", 5)],
            )
            .unwrap();
            assert_eq!(o[0].name, "z");
            assert_eq!(o[3].name, "c");
            seen_first.insert(o[1].name.clone());
        }
        assert_eq!(seen_first.len(), 2, "equal preferences must be shuffled");
    }
}

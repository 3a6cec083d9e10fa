//! DNS lookups for domain ownership checks, with hickory-resolver against
//! configured nameservers and no cache, so a record the customer just
//! created is seen. NXDOMAIN and NODATA both mean "no record yet".

use std::net::SocketAddr;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use crate::error::{Error, Result};

pub struct DnsChecker {
    /// `None`: no nameserver is configured (checks are off).
    resolver: Option<TokioResolver>,
}

impl DnsChecker {
    pub fn new(nameservers: &[SocketAddr]) -> Self {
        if nameservers.is_empty() {
            return DnsChecker { resolver: None };
        }
        // Each server over UDP, and over TCP for answers too long for UDP.
        let servers: Vec<NameServerConfig> = nameservers
            .iter()
            .map(|a| {
                let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut c| {
                        c.port = a.port();
                        c
                    })
                    .collect();
                NameServerConfig::new(a.ip(), true, connections)
            })
            .collect();
        let config = ResolverConfig::from_parts(None, vec![], servers);
        let mut builder =
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        let opts = builder.options_mut();
        opts.cache_size = 0;
        opts.attempts = 2;
        opts.timeout = std::time::Duration::from_secs(3);
        let resolver = builder
            .build()
            .inspect_err(
                |e| tracing::error!(error = %e, "DNS resolver not built; domain checks are off"),
            )
            .ok();
        DnsChecker { resolver }
    }

    /// The TXT strings at `name`; empty when there are none (yet).
    pub async fn txt(&self, name: &str) -> Result<Vec<String>> {
        let Some(resolver) = &self.resolver else {
            return Err(Error::Disabled {
                code: "dns_disabled",
                message: "no nameservers are configured (--dns-nameservers)".into(),
            });
        };
        match resolver.txt_lookup(format!("{name}.")).await {
            Ok(found) => Ok(found
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(t.to_string()),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
            Err(e) => {
                tracing::warn!(name, error = %e, "DNS lookup failed");
                Err(Error::Disabled {
                    code: "dns_unavailable",
                    message: "the DNS check could not be made; try again shortly".into(),
                })
            }
        }
    }
}

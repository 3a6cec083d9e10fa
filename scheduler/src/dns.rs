//! DNS lookups for domain ownership checks, with hickory-resolver against
//! configured nameservers and no cache, so a record the customer just
//! created is seen. NXDOMAIN and NODATA both mean "no record yet".

use std::net::SocketAddr;

use hickory_resolver::config::{NameServerConfig, NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::Resolver;

use crate::error::{Error, Result};

pub struct DnsChecker {
    resolver: Resolver<TokioConnectionProvider>,
}

impl DnsChecker {
    pub fn new(nameservers: &[SocketAddr]) -> Self {
        let servers: Vec<NameServerConfig> = nameservers
            .iter()
            .flat_map(|a| {
                [
                    NameServerConfig::new(*a, Protocol::Udp),
                    NameServerConfig::new(*a, Protocol::Tcp),
                ]
            })
            .collect();
        let config = ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::from(servers));
        let mut builder = Resolver::builder_with_config(config, TokioConnectionProvider::default());
        let opts = builder.options_mut();
        opts.cache_size = 0;
        opts.attempts = 2;
        opts.timeout = std::time::Duration::from_secs(3);
        DnsChecker {
            resolver: builder.build(),
        }
    }

    /// The TXT strings at `name`; empty when there are none (yet).
    pub async fn txt(&self, name: &str) -> Result<Vec<String>> {
        if self.resolver.config().name_servers().is_empty() {
            return Err(Error::Disabled {
                code: "dns_disabled",
                message: "no nameservers are configured (--dns-nameservers)".into(),
            });
        }
        match self.resolver.txt_lookup(format!("{name}.")).await {
            Ok(found) => Ok(found.iter().map(|t| t.to_string()).collect()),
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

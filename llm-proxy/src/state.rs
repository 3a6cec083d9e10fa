//! The proxy's shared state and its one routing decision: which upstream
//! a request goes to, with which key, and who pays.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use crate::error::{ProxyError, Result};
use crate::ledger::Ledger;
use crate::limits::Limits;
use crate::prices::Prices;
use crate::tenant::{Tenant, Tenants};
use crate::usage::{PayMode, Recorder};

pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<bytes::Bytes>>;

/// The platform's own upstream (OpenRouter-compatible), for AI credits.
#[derive(Clone)]
pub struct CreditsUpstream {
    pub base_url: String,
    pub key: String,
}

/// Where requests go.
#[derive(Clone, Default)]
pub struct Upstreams {
    /// Each provider's OpenAI-compatible base URL, for customers' own keys.
    pub byok: BTreeMap<String, String>,
    /// The platform's upstream; `None`: AI credits are not sold.
    pub credits: Option<CreditsUpstream>,
}

/// Where one request goes.
#[derive(Clone)]
pub struct Route {
    pub pay_mode: PayMode,
    pub base_url: String,
    pub key: String,
}

pub struct Proxy {
    pub tenants: Arc<Tenants>,
    pub ledger: Arc<Ledger>,
    pub recorder: Arc<Recorder>,
    pub limits: Limits,
    pub prices: Prices,
    pub upstreams: Upstreams,
    pub client: UpstreamClient,
    /// Percent on top of the price table for AI credits.
    pub markup: u32,
    pub max_body: usize,
    /// How long a stream whose client left is still read for its usage.
    pub drain: Duration,
    pub first_byte_timeout: Duration,
    /// The fewest output tokens a credits request may be capped to.
    pub min_output_tokens: u64,
}

impl Proxy {
    /// The customer's own key for `provider` when they gave one (0 %
    /// markup); otherwise AI credits through the platform's upstream.
    pub fn route(&self, tenant: &Tenant, provider: &str) -> Result<Route> {
        if let Some(key) = tenant.keys.get(provider) {
            let base_url = self
                .upstreams
                .byok
                .get(provider)
                .ok_or_else(|| ProxyError::ProviderNotConfigured(provider.to_owned()))?;
            return Ok(Route {
                pay_mode: PayMode::Byok,
                base_url: base_url.trim_end_matches('/').to_owned(),
                key: key.clone(),
            });
        }
        match &self.upstreams.credits {
            Some(c) => Ok(Route {
                pay_mode: PayMode::Credits,
                base_url: c.base_url.trim_end_matches('/').to_owned(),
                key: c.key.clone(),
            }),
            None => Err(ProxyError::ProviderNotConfigured(provider.to_owned())),
        }
    }
}

/// The client for upstreams: HTTPS (webpki roots) or plain HTTP, HTTP/1.1
/// with pooled connections.
pub fn upstream_client() -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(4096)
        .build(https)
}

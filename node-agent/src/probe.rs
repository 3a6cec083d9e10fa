//! HTTP probes of a tenant container: `/healthz` for liveness, and an
//! authenticated `GET /v1/models` that proves a tenant config is live.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::error::{Error, Result};

/// How the reconciler asks a container's gateway whether it answers and
/// which providers it runs: over HTTP in production (`Prober`), in memory in
/// tests (`runtime::fake::FakeRuntime`).
pub trait GatewayProbe: Clone + Send + Sync + 'static {
    /// `GET /healthz` answers `{"ok":true…}`.
    fn healthy(&self, upstream: &str) -> impl Future<Output = bool> + Send;
    /// The providers the gateway reports as configured, seen with its token.
    fn live_providers(
        &self,
        upstream: &str,
        token: &str,
    ) -> impl Future<Output = Result<BTreeSet<String>>> + Send;
}

#[derive(Clone)]
pub struct Prober {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Prober {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }
}

impl Prober {
    async fn get(&self, upstream: &str, path: &str, token: Option<&str>) -> Result<(u16, Bytes)> {
        let mut req = hyper::Request::get(format!("http://{upstream}{path}"));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| Error::Probe(e.to_string()))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| Error::Probe(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Probe(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(Duration::from_secs(2), fut)
            .await
            .map_err(|_| Error::Probe(format!("{path} timed out")))?
    }
}

impl GatewayProbe for Prober {
    async fn healthy(&self, upstream: &str) -> bool {
        matches!(self.get(upstream, "/healthz", None).await, Ok((200, body)) if body.starts_with(b"{\"ok\":true"))
    }

    async fn live_providers(&self, upstream: &str, token: &str) -> Result<BTreeSet<String>> {
        let (status, body) = self.get(upstream, "/v1/models", Some(token)).await?;
        if status != 200 {
            return Err(Error::Probe(format!("/v1/models answered {status}")));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| Error::Probe(e.to_string()))?;
        let data = v
            .get("data")
            .and_then(|d| d.as_array())
            .ok_or_else(|| Error::Probe("no data in /v1/models".into()))?;
        Ok(data
            .iter()
            .filter_map(|m| {
                m.get("owned_by")
                    .and_then(|o| o.as_str())
                    .map(str::to_owned)
            })
            .collect())
    }
}

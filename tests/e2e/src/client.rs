//! The customer's and the operator's side of a cluster: the scheduler's
//! HTTP API (registration, signups, the instance, `/admin`) and requests
//! through the edge (HTTP and WebSocket).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::Value;

use crate::{wait_for, Cluster, ADMIN_TOKEN};

impl Cluster {
    pub fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub async fn wait_http_up(&self) -> Result<()> {
        self.wait_http_up_on(self.http).await
    }

    pub async fn wait_http_up_on(&self, addr: SocketAddr) -> Result<()> {
        wait_for(Duration::from_secs(60), "scheduler HTTP up", || async {
            Ok(self
                .client
                .get(format!("http://{addr}/healthz"))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false))
        })
        .await
    }

    /// Calls the operator API; returns status and JSON body.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Result<(u16, Value)> {
        let mut req = self.client.request(method, self.api(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// A join token for `node_id` (and the CA pin) from the operator API.
    pub async fn join_token(&self, node_id: &str, ttl_secs: Option<u64>) -> Result<Value> {
        let mut body = serde_json::json!({"nodeId": node_id});
        if let Some(t) = ttl_secs {
            body["ttlSecs"] = t.into();
        }
        let (status, v) = self
            .admin(
                reqwest::Method::POST,
                "/admin/join-tokens",
                Some(body),
                Some(ADMIN_TOKEN),
            )
            .await?;
        anyhow::ensure!(status == 201, "join token answered {status}: {v}");
        Ok(v)
    }

    /// Registers `email` and proves its address as the mailed link would
    /// (verification has tests of its own); returns the session token.
    pub async fn register(&self, email: &str) -> Result<String> {
        let token = self.register_unverified(email).await?;
        sqlx::query("UPDATE users SET email_verified_at = now() WHERE email = $1")
            .bind(email)
            .execute(&self.db)
            .await?;
        Ok(token)
    }

    /// Registers `email`, its address left unproven.
    pub async fn register_unverified(&self, email: &str) -> Result<String> {
        let r = self
            .client
            .post(self.api("/api/auth/register"))
            .json(&serde_json::json!({"email": email, "password": "correct-horse-battery"}))
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        anyhow::ensure!(status == 201, "register answered {status}: {body}");
        Ok(body["token"].as_str().context("token")?.to_owned())
    }

    /// Registers `<prefix><i>@example.com` for i in 0..n, concurrently;
    /// returns their account tokens in order.
    pub async fn register_many(&self, prefix: &str, n: usize) -> Result<Vec<String>> {
        let emails: Vec<String> = (0..n).map(|i| format!("{prefix}{i}@example.com")).collect();
        futures::future::join_all(emails.iter().map(|e| self.register(e)))
            .await
            .into_iter()
            .collect()
    }

    pub async fn create_instance(&self, token: &str, body: &Value) -> Result<(u16, Value)> {
        let r = self
            .client
            .post(self.api("/api/instances"))
            .bearer_auth(token)
            .json(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    /// `GET`, `PATCH` (with `body`) or `DELETE` on the caller's instance
    /// (`/api/instances/me`): the status and the JSON answer.
    pub async fn my_instance(
        &self,
        method: reqwest::Method,
        token: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .client
            .request(method, self.api("/api/instances/me"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Polls the caller's instance until it is ready; its gateway token. A
    /// `failed` instance is an error at once.
    pub async fn wait_ready_token(&self, token: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.my_instance(reqwest::Method::GET, token, None).await?;
            if status == 200 && body["instance"]["status"] == "ready" {
                return Ok(body["instance"]["gatewayToken"]
                    .as_str()
                    .context("gateway token")?
                    .to_owned());
            }
            anyhow::ensure!(
                body["instance"]["status"] != "failed",
                "the instance failed: {body}"
            );
            anyhow::ensure!(
                Instant::now() < deadline,
                "not ready in {within:?}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Registers `email` and signs up for `subdomain` with provider `keys`,
    /// expecting 201. Returns the account token and the gateway token.
    pub async fn sign_up(
        &self,
        email: &str,
        subdomain: &str,
        keys: Value,
    ) -> Result<(String, String)> {
        let token = self.register(email).await?;
        let (status, body) = self
            .create_instance(
                &token,
                &serde_json::json!({"subdomain": subdomain, "apiKeys": keys}),
            )
            .await?;
        anyhow::ensure!(status == 201, "signup answered {status}: {body}");
        let gw = body["instance"]["gatewayToken"]
            .as_str()
            .context("gateway token")?
            .to_owned();
        Ok((token, gw))
    }

    /// GET through the edge with a Host header.
    pub async fn edge_get(
        &self,
        host: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<(u16, String)> {
        let mut req = self
            .client
            .get(format!("http://{}{path}", self.edge))
            .header("host", host);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }

    /// Opens a WebSocket through the edge, authenticates with `token` and
    /// returns what the gateway echoes for `message`.
    pub async fn ws_echo(&self, host: &str, token: &str, message: &str) -> Result<String> {
        use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
        let stream = tokio::net::TcpStream::connect(self.edge).await?;
        let mut req = format!("ws://{}/ws", self.edge).into_client_request()?;
        req.headers_mut().insert("host", host.parse()?);
        let (mut ws, resp) = tokio_tungstenite::client_async(req, stream).await?;
        anyhow::ensure!(resp.status() == 101, "upgrade answered {}", resp.status());
        ws.send(Message::text(token)).await?;
        let hello = ws.next().await.context("no hello")??;
        anyhow::ensure!(
            hello.to_text()?.contains("\"ok\":true"),
            "gateway refused the token: {hello}"
        );
        ws.send(Message::text(message)).await?;
        let echo = ws.next().await.context("no echo")??;
        let _ = ws.close(None).await;
        Ok(echo.to_text()?.to_owned())
    }
}

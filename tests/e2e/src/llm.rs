//! The model-access stack of a test: two OpenAI-compatible upstream
//! stand-ins (a provider for customers' own keys, and the platform's
//! OpenRouter-style upstream for AI credits) and metering proxies. The
//! proxy listens on the host's Docker bridge address, which tenant
//! containers reach through the agent's `--tenant-allow` rule; the
//! scheduler points every provider entry at it.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{bin_dir, free_addr, wait_for, Cluster, ClusterOptions};

/// The key the customer's "openai" provider accepts.
pub const BYOK_KEY: &str = "sk-customer-own-key-0123456789";
/// The platform's key for its credits upstream.
pub const PLATFORM_KEY: &str = "sk-platform-upstream-key";

pub struct LlmStack {
    children: Vec<Child>,
    proxies: Vec<Option<Child>>,
    /// Where tenants reach the first proxy (the bridge address).
    pub proxy: SocketAddrV4,
    pub byok_upstream: String,
    pub credits_upstream: String,
}

impl Drop for LlmStack {
    fn drop(&mut self) {
        for c in self
            .children
            .iter_mut()
            .chain(self.proxies.iter_mut().flatten())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The host's address on Docker's default bridge: local to the host, and
/// reachable from a container once the firewall allows it.
fn bridge_ip() -> Result<Ipv4Addr> {
    let out = Command::new("docker")
        .args([
            "network",
            "inspect",
            "bridge",
            "--format",
            "{{json .IPAM.Config}}",
        ])
        .output()
        .context("docker network inspect bridge")?;
    let config: Value = serde_json::from_slice(&out.stdout).context("the bridge's IPAM config")?;
    let first = &config[0];
    if let Some(gw) = first["Gateway"].as_str() {
        return gw.parse().context("the bridge's gateway");
    }
    // Docker leaves the gateway out when it is the subnet's first address.
    let subnet = first["Subnet"].as_str().context("the bridge's subnet")?;
    let base: Ipv4Addr = subnet.split('/').next().unwrap_or_default().parse()?;
    Ok(Ipv4Addr::from(u32::from(base) + 1))
}

async fn upstream(models: &str, key: &str) -> Result<(Child, String)> {
    let addr = free_addr();
    let child = Command::new(bin_dir().join("clawdeploy-llm-standin"))
        .args([
            "--listen",
            &addr.to_string(),
            "--api-key",
            key,
            "--models",
            models,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting an upstream stand-in")?;
    let mut child = child;
    let url = format!("http://{addr}");
    let probe = url.clone();
    let up = wait_for(Duration::from_secs(10), "an upstream stand-in up", || {
        let probe = probe.clone();
        async move { Ok(reqwest::get(format!("{probe}/v1/models")).await.is_ok()) }
    })
    .await;
    if let Err(e) = up {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok((child, url))
}

impl LlmStack {
    /// The upstreams, and the proxy's address (it starts once the
    /// scheduler has made the key, `start_proxy`).
    pub async fn upstreams() -> Result<Self> {
        // Owned by the stack as soon as each starts, so a failure later
        // still stops them.
        let mut stack = Self {
            children: Vec::new(),
            proxies: Vec::new(),
            proxy: SocketAddrV4::new(bridge_ip()?, free_addr().port()),
            byok_upstream: String::new(),
            credits_upstream: String::new(),
        };
        let (a, url) = upstream("gpt-4o-mini,gpt-4o", BYOK_KEY).await?;
        stack.children.push(a);
        stack.byok_upstream = url;
        let (b, url) = upstream("openai/gpt-4o-mini,openai/gpt-4o", PLATFORM_KEY).await?;
        stack.children.push(b);
        stack.credits_upstream = url;
        Ok(stack)
    }

    /// `opts` with the scheduler pointing tenants at the proxy (reselling
    /// openai) and the agents letting them reach it.
    pub fn cluster_options(&self, mut opts: ClusterOptions) -> ClusterOptions {
        opts.scheduler_args.extend([
            "--llm-proxy-url".into(),
            format!("http://{}", self.proxy),
            "--resold-providers".into(),
            "openai".into(),
        ]);
        opts.agent_env
            .push(("CLAWDEPLOY_TENANT_ALLOW".into(), self.proxy.to_string()));
        opts
    }

    /// Starts a proxy (the first on `self.proxy`, others on a port of
    /// their own on the same address) with `extra` flags; returns its
    /// index and address.
    pub async fn start_proxy(
        &mut self,
        c: &Cluster,
        extra: &[&str],
    ) -> Result<(usize, SocketAddrV4)> {
        let i = self.proxies.len();
        let addr = if i == 0 {
            self.proxy
        } else {
            SocketAddrV4::new(*self.proxy.ip(), free_addr().port())
        };
        let child = self.spawn_proxy(c, i, addr, extra)?;
        self.proxies.push(Some(child));
        self.wait_up(addr).await?;
        Ok((i, addr))
    }

    fn spawn_proxy(
        &self,
        c: &Cluster,
        i: usize,
        addr: SocketAddrV4,
        extra: &[&str],
    ) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(c.dir.join("logs").join(format!("llm-proxy-{i}.log")))?;
        Command::new(bin_dir().join("clawdeploy-llm-proxy"))
            .args(["--listen", &addr.to_string()])
            .args(["--metrics-listen", &free_addr().to_string()])
            .args(["--database-url", &c.db_url])
            .arg("--secret-key-file")
            .arg(c.dir.join("scheduler").join("secret.key"))
            .args(["--proxy-id", &format!("proxy-{i}")])
            .args([
                "--provider-url",
                &format!("openai={}/v1", self.byok_upstream),
            ])
            .args([
                "--credits-upstream-url",
                &format!("{}/v1", self.credits_upstream),
            ])
            .args(["--credits-upstream-key", PLATFORM_KEY])
            .args(["--flush-ms", "300"])
            .args(extra)
            .env("RUST_LOG", "info,clawdeploy_llm_proxy=debug")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the llm proxy")
    }

    async fn wait_up(&self, addr: SocketAddrV4) -> Result<()> {
        wait_for(Duration::from_secs(20), "the llm proxy up", || async move {
            Ok(reqwest::get(format!("http://{addr}/healthz")).await.is_ok())
        })
        .await
    }

    /// Stops proxy `i`: SIGTERM (it returns its leases) or SIGKILL.
    pub async fn stop_proxy(&mut self, i: usize, kill: bool) -> Result<()> {
        if let Some(mut child) = self.proxies[i].take() {
            if kill {
                child.kill()?;
            } else {
                Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status()?;
            }
            tokio::task::spawn_blocking(move || child.wait()).await??;
        }
        Ok(())
    }

    /// Restarts proxy `i` on its address.
    pub async fn restart_proxy(
        &mut self,
        c: &Cluster,
        i: usize,
        addr: SocketAddrV4,
        extra: &[&str],
    ) -> Result<()> {
        let child = self.spawn_proxy(c, i, addr, extra)?;
        self.proxies[i] = Some(child);
        self.wait_up(addr).await
    }

    /// The streams the credits upstream sent, oldest first.
    pub async fn credits_streams(&self) -> Result<Vec<Value>> {
        Ok(
            reqwest::get(format!("{}/_test/responses", self.credits_upstream))
                .await?
                .json()
                .await?,
        )
    }

    /// Arms a fault on the credits upstream.
    pub async fn credits_fault(&self, body: Value) -> Result<()> {
        reqwest::Client::new()
            .post(format!("{}/_test/faults", self.credits_upstream))
            .json(&body)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

//! End-to-end harness: a whole ClawDeploy system as separate processes (the
//! scheduler, node agents and the edge) against a fresh PostgreSQL database
//! and the real Docker engine. Used by the tests in `tests/` and by the
//! benchmark binary.
//!
//! Needs what `scripts/test` sets up: the binaries built, the stand-in image,
//! and `CLAWDEPLOY_TEST_PG` pointing at a local PostgreSQL server.

pub mod acme;
pub mod cgroup;
pub mod edge_client;
pub mod invariants;
pub mod netfault;
pub mod ops;
pub mod pg;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use sqlx::PgPool;

pub const BASE_DOMAIN: &str = "clawdeploy.localhost";

/// Where the workspace's binaries are (next to this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CLAWDEPLOY_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// A loopback port for a test process to listen on. Taken from below the
/// kernel's ephemeral range (32768+), where port 0 would pick: there, any
/// outgoing connection of a parallel test could take the port between this
/// check and the process's bind. Never handed out twice per test binary.
pub fn free_addr() -> SocketAddr {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = 10_000 + (uuid::Uuid::new_v4().as_u128() % 22_000) as u16;
        let mut used = HANDED_OUT.lock().unwrap();
        if used.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.push(port);
            return SocketAddr::from(([127, 0, 0, 1], port));
        }
    }
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub min_idle: u32,
    pub max_idle: u32,
    pub max_containers: u32,
    pub claim_wait_secs: u64,
    /// Nodes join with one-time tokens instead of pre-issued certificates.
    pub join: bool,
    /// Node certificate lifetime the scheduler issues (join and renewal).
    pub node_cert_ttl_secs: Option<u64>,
    /// Address agents bind their metrics port on.
    pub agent_metrics_ip: std::net::IpAddr,
    /// Scheduler processes sharing the database (agents and the edge get
    /// all their addresses).
    pub schedulers: usize,
    /// Seconds before an unconfirmed claim moves to a fresh container.
    pub claim_timeout_secs: Option<u64>,
    /// The edge terminates TLS with a wildcard certificate for
    /// `*.<BASE_DOMAIN>` from the test's own public CA.
    pub edge_tls: bool,
    /// More flags for the edge (limits, timeouts).
    pub edge_args: Vec<String>,
    /// More flags for every scheduler.
    pub scheduler_args: Vec<String>,
    /// The edge's plain listener (a test that starts a CA first needs to
    /// know it); a free port when unset.
    pub edge_listen: Option<SocketAddr>,
    /// The PostgreSQL server the test database is made on (a test's own,
    /// which it may restart); `CLAWDEPLOY_TEST_PG` when unset.
    pub admin_db_url: Option<String>,
    /// Each agent and the edge reach the (first) scheduler through a relay
    /// of their own (`Cluster::relay`), where a test can cut or slow the
    /// network (see `netfault`).
    pub relays: bool,
    /// Node `i`'s state directory (its ledger and its tenants' volumes) on
    /// a tmpfs of this many MiB, which a test can fill.
    pub small_state_disk: Option<(usize, u32)>,
    /// Node `i`'s agent runs with its wall clock moved by this much
    /// (libfaketime's offset syntax: "+3m", "-3m"); its monotonic clock is
    /// left alone.
    pub clock_skew: Vec<(usize, String)>,
}

/// The operator token every test scheduler accepts on `/admin`.
pub const ADMIN_TOKEN: &str = "test-admin-token";

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 2,
            min_idle: 5,
            max_idle: 20,
            max_containers: 20,
            claim_wait_secs: 20,
            join: false,
            node_cert_ttl_secs: None,
            agent_metrics_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            schedulers: 1,
            claim_timeout_secs: None,
            edge_tls: false,
            edge_args: Vec::new(),
            scheduler_args: Vec::new(),
            edge_listen: None,
            admin_db_url: None,
            relays: false,
            small_state_disk: None,
            clock_skew: Vec::new(),
        }
    }
}

pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    pub opts: ClusterOptions,
    pub db_url: String,
    admin_db_url: String,
    db_name: String,
    pub db: PgPool,
    /// The scheduler API the helpers call (scheduler 0's unless a test
    /// points it at another).
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// Every scheduler's HTTP and gRPC address.
    pub https: Vec<SocketAddr>,
    pub grpcs: Vec<SocketAddr>,
    pub edge: SocketAddr,
    /// The edge's HTTPS listener (with `edge_tls`).
    pub edge_tls: SocketAddr,
    pub edge_admin: SocketAddr,
    pub node_ids: Vec<String>,
    pub agent_metrics: Vec<SocketAddr>,
    schedulers: Vec<Option<Child>>,
    agents: Vec<Option<Child>>,
    edge_proc: Option<Child>,
    pub client: reqwest::Client,
    /// Set when start-up failed: the logs are kept for the post-mortem.
    keep_logs: bool,
    /// By node id or edge id, with `relays`.
    relays: HashMap<String, netfault::Relay>,
}

impl Cluster {
    /// Starts PostgreSQL database, scheduler, agents and edge; returns once
    /// every agent has said hello.
    pub async fn start(opts: ClusterOptions) -> Result<Self> {
        let admin_db_url = match &opts.admin_db_url {
            Some(url) => url.clone(),
            None => std::env::var("CLAWDEPLOY_TEST_PG")
                .context("CLAWDEPLOY_TEST_PG is not set: run the suite with scripts/test")?,
        };
        let name = format!("t{}", short_id());
        let dir = workspace_root().join(".local/e2e").join(&name);
        std::fs::create_dir_all(dir.join("logs"))?;
        let db_name = format!("cd_{name}");
        let admin = PgPool::connect(&admin_db_url)
            .await
            .context("connecting to the test PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let db_url = match admin_db_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{db_name}"),
            None => bail!("CLAWDEPLOY_TEST_PG must end with /<database>"),
        };
        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&db_url)
            .await?;
        let node_ids: Vec<String> = (0..opts.nodes)
            .map(|i| format!("{name}-{}", (b'a' + i as u8) as char))
            .collect();
        let metrics_ip = opts.agent_metrics_ip;
        let edge = opts.edge_listen.unwrap_or_else(free_addr);
        let https: Vec<SocketAddr> = (0..opts.schedulers.max(1)).map(|_| free_addr()).collect();
        let grpcs: Vec<SocketAddr> = (0..opts.schedulers.max(1)).map(|_| free_addr()).collect();
        let mut c = Cluster {
            agent_metrics: node_ids
                .iter()
                .map(|_| SocketAddr::new(metrics_ip, free_addr().port()))
                .collect(),
            agents: node_ids.iter().map(|_| None).collect(),
            name,
            dir,
            opts,
            db_url,
            admin_db_url,
            db_name,
            db,
            http: https[0],
            grpc: grpcs[0],
            schedulers: https.iter().map(|_| None).collect(),
            https,
            grpcs,
            edge,
            edge_tls: free_addr(),
            edge_admin: free_addr(),
            node_ids,
            edge_proc: None,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(256)
                .build()?,
            keep_logs: false,
            relays: HashMap::new(),
        };
        if c.opts.relays {
            for who in c.node_ids.clone().into_iter().chain(["edge-1".to_owned()]) {
                c.relays
                    .insert(who, netfault::Relay::start(c.grpcs[0]).await?);
            }
        }
        if let Some((i, mib)) = c.opts.small_state_disk {
            let dir = c.state_dir(i);
            std::fs::create_dir_all(&dir)?;
            let st = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={mib}m,mode=0700"),
                    "tmpfs",
                ])
                .arg(&dir)
                .status()?;
            anyhow::ensure!(st.success(), "mounting a tmpfs at {}", dir.display());
        }
        if let Err(e) = c.boot().await {
            c.keep_logs = true;
            return Err(e);
        }
        Ok(c)
    }

    /// Certificates, scheduler, agents (joining or not) and edge.
    async fn boot(&mut self) -> Result<()> {
        let c = self;
        c.issue_certs()?;
        if c.opts.edge_tls {
            edge_client::PublicPki::create(&c.public_tls_dir())?.issue_wildcard(BASE_DOMAIN, 1)?;
        }
        // One after the other: the first creates the shared secret key.
        for i in 0..c.https.len() {
            c.start_scheduler_n(i)?;
            c.wait_http_up_on(c.https[i]).await?;
        }
        for i in 0..c.node_ids.len() {
            if c.opts.join {
                let node = c.node_ids[i].clone();
                let t = c.join_token(&node, None).await?;
                let env = [
                    (
                        "CLAWDEPLOY_JOIN_TOKEN",
                        t["token"].as_str().context("token")?,
                    ),
                    ("CLAWDEPLOY_CA_PIN", t["caPin"].as_str().context("pin")?),
                ];
                c.start_agent_env(i, &env)?;
            } else {
                c.start_agent(i)?;
            }
        }
        c.start_edge()?;
        c.wait_nodes_connected(Duration::from_secs(60)).await
    }

    /// A one-node system whose pool already holds `min_idle` idle containers.
    pub async fn single_node_warm(min_idle: u32) -> Result<Self> {
        let c = Self::start(ClusterOptions {
            nodes: 1,
            min_idle,
            ..Default::default()
        })
        .await?;
        c.wait_idle(i64::from(min_idle), false, Duration::from_secs(120))
            .await?;
        Ok(c)
    }

    fn scheduler_bin(&self) -> PathBuf {
        bin_dir().join("clawdeploy-scheduler")
    }

    fn issue_certs(&self) -> Result<()> {
        let data = self.dir.join("scheduler");
        let tls = self.dir.join("tls");
        let mut ids: Vec<(&str, String)> = if self.opts.join {
            Vec::new()
        } else {
            self.node_ids.iter().map(|n| ("node", n.clone())).collect()
        };
        ids.push(("edge", "edge-1".into()));
        for (kind, id) in ids {
            let st = Command::new(self.scheduler_bin())
                .args(["pki", "issue", "--kind", kind, "--id", &id])
                .arg("--data-dir")
                .arg(&data)
                .arg("--out")
                .arg(&tls)
                .stdout(Stdio::null())
                .status()?;
            anyhow::ensure!(st.success(), "issuing a certificate for {id} failed");
        }
        Ok(())
    }

    fn log_file(&self, name: &str) -> Result<Stdio> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{name}.log")))?;
        Ok(Stdio::from(f))
    }

    /// (Re)starts scheduler 0.
    pub fn start_scheduler(&mut self) -> Result<()> {
        self.start_scheduler_n(0)
    }

    /// All schedulers' gRPC URLs, comma-separated, for the agent or edge
    /// `who`: its relay's when it has one.
    fn scheduler_urls(&self, who: &str) -> String {
        if let Some(r) = self.relays.get(who) {
            return format!("https://{}", r.addr);
        }
        let urls: Vec<String> = self.grpcs.iter().map(|a| format!("https://{a}")).collect();
        urls.join(",")
    }

    /// Node `i`'s agent's state directory (ledger, tenant volumes).
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.node_ids[i])
    }

    /// The relay between `who` (a node id, or `edge-1`) and the scheduler,
    /// with `relays`.
    pub fn relay(&self, who: &str) -> &netfault::Relay {
        &self.relays[who]
    }

    pub fn start_scheduler_n(&mut self, i: usize) -> Result<()> {
        let mut cmd = Command::new(self.scheduler_bin());
        cmd.arg("serve").args(["--admin-token", ADMIN_TOKEN]);
        if let Some(ttl) = self.opts.node_cert_ttl_secs {
            cmd.args(["--node-cert-ttl-secs", &ttl.to_string()]);
        }
        if let Some(t) = self.opts.claim_timeout_secs {
            cmd.args(["--claim-timeout-secs", &t.to_string()]);
        }
        let log = if i == 0 {
            "scheduler".to_owned()
        } else {
            format!("scheduler{i}")
        };
        let child = cmd
            .args([
                "--http-listen",
                &self.https[i].to_string(),
                "--grpc-listen",
                &self.grpcs[i].to_string(),
            ])
            .args(["--database-url", &self.db_url])
            // 40 connections unless the test says otherwise.
            .args(
                if self
                    .opts
                    .scheduler_args
                    .iter()
                    .any(|a| a == "--db-max-connections")
                {
                    Vec::new()
                } else {
                    vec!["--db-max-connections", "40"]
                },
            )
            .arg("--data-dir")
            .arg(self.dir.join("scheduler"))
            .args(if self.opts.edge_tls {
                ["--public-scheme", "https"].map(String::from).to_vec()
            } else {
                ["--public-scheme", "http"].map(String::from).to_vec()
            })
            .args([
                "--public-port",
                &if self.opts.edge_tls {
                    self.edge_tls
                } else {
                    self.edge
                }
                .port()
                .to_string(),
            ])
            .args([
                "--min-idle",
                &self.opts.min_idle.to_string(),
                "--max-idle",
                &self.opts.max_idle.to_string(),
            ])
            .args(["--claim-wait-secs", &self.opts.claim_wait_secs.to_string()])
            // The page is served here: billing's redirects come back to it
            // (unless the test names another origin).
            .args(
                (!self
                    .opts
                    .scheduler_args
                    .iter()
                    .any(|a| a == "--public-origin"))
                .then(|| {
                    [
                        "--public-origin".to_owned(),
                        format!("http://{}", self.https[i]),
                    ]
                })
                .into_iter()
                .flatten(),
            )
            // Every test registers from 127.0.0.1: no per-address limit
            // unless the test sets one.
            .args(
                (!self
                    .opts
                    .scheduler_args
                    .iter()
                    .any(|a| a == "--registrations-per-address-per-hour"))
                .then_some(["--registrations-per-address-per-hour", "1000000"])
                .into_iter()
                .flatten(),
            )
            .args(&self.opts.scheduler_args)
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(self.log_file(&log)?)
            .stderr(self.log_file(&log)?)
            .spawn()
            .context("starting the scheduler")?;
        self.schedulers[i] = Some(child);
        Ok(())
    }

    /// An agent process for `node_id`, logging to `logs/<log_name>.log`,
    /// with extra environment (join token, crash point).
    fn spawn_agent(
        &self,
        node_id: &str,
        tls_dir: &Path,
        log_name: &str,
        metrics: SocketAddr,
        env: &[(&str, &str)],
    ) -> Result<Child> {
        let skew = self
            .node_ids
            .iter()
            .position(|n| n == node_id)
            .and_then(|i| self.opts.clock_skew.iter().find(|(j, _)| *j == i));
        let mut cmd = Command::new(bin_dir().join("clawdeploy-agent"));
        if let Some((_, offset)) = skew {
            // libfaketime preloaded into the agent itself (the `faketime`
            // command forks, and killing it would orphan the agent).
            cmd.env("LD_PRELOAD", libfaketime()?)
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        cmd.envs(env.iter().copied())
            .args([
                "--node-id",
                node_id,
                "--scheduler-url",
                &self.scheduler_urls(node_id),
                "--scheduler-name",
                "localhost",
            ])
            .arg("--tls-dir")
            .arg(tls_dir)
            .arg("--state-dir")
            .arg(self.dir.join(log_name))
            .args(["--metrics-listen", &metrics.to_string()])
            // `CLAWDEPLOY_MAX_CONTAINERS` in `env` gives this agent its own.
            .args(
                env.iter()
                    .all(|(k, _)| *k != "CLAWDEPLOY_MAX_CONTAINERS")
                    .then(|| {
                        [
                            "--max-containers".to_owned(),
                            self.opts.max_containers.to_string(),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .env(
                "RUST_LOG",
                std::env::var("CLAWDEPLOY_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(self.log_file(log_name)?)
            .stderr(self.log_file(log_name)?)
            .spawn()
            .context("starting an agent")
    }

    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        self.start_agent_env(i, &[])
    }

    /// (Re)starts node `i`'s agent on its usual state and TLS directories.
    pub fn start_agent_env(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        let node = self.node_ids[i].clone();
        let child = self.spawn_agent(
            &node,
            &self.dir.join("tls"),
            &node,
            self.agent_metrics[i],
            env,
        )?;
        self.agents[i] = Some(child);
        Ok(())
    }

    /// SIGKILLs node `i`'s agent; its containers keep running.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until node `i`'s agent has exited by itself (a crash point, a
    /// refused join); returns how it ended.
    pub async fn wait_agent_exit(
        &mut self,
        i: usize,
        within: Duration,
    ) -> Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let child = self.agents[i].as_mut().context("agent not running")?;
            if let Some(st) = child.try_wait()? {
                self.agents[i] = None;
                return Ok(st);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "agent {i} still running"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts an extra agent process with any node id and certificate
    /// directory (for identity tests); returns it with its log path.
    pub fn spawn_agent_with(&self, node_id: &str, tls_dir: &Path) -> Result<(Child, PathBuf)> {
        self.spawn_agent_env_with(node_id, tls_dir, &[])
    }

    /// Like `spawn_agent_with`, with extra environment.
    pub fn spawn_agent_env_with(
        &self,
        node_id: &str,
        tls_dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<(Child, PathBuf)> {
        let name = format!("extra-{node_id}");
        let child = self.spawn_agent(node_id, tls_dir, &name, free_addr(), env)?;
        Ok((child, self.dir.join("logs").join(format!("{name}.log"))))
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

    /// One Prometheus sample from node `i`'s agent (0 when absent).
    pub async fn agent_metric(&self, i: usize, name: &str) -> Result<f64> {
        self.metric_at(self.agent_metrics[i], name).await
    }

    /// One Prometheus sample from the process serving `/metrics` at `addr`
    /// (0 when absent).
    pub async fn metric_at(&self, addr: SocketAddr, name: &str) -> Result<f64> {
        let text = self
            .client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        Ok(metric_value(&text, name).unwrap_or(0.0))
    }

    /// Issues a certificate from a CA the scheduler does not trust.
    pub fn foreign_cert(&self, kind: &str, id: &str) -> Result<PathBuf> {
        let out = self.dir.join("foreign-tls");
        let st = Command::new(self.scheduler_bin())
            .args(["pki", "issue", "--kind", kind, "--id", id])
            .arg("--data-dir")
            .arg(self.dir.join("foreign-ca"))
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "issuing a foreign certificate failed");
        Ok(out)
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// The edge's public certificate, key and the CA that signed them.
    pub fn public_tls_dir(&self) -> PathBuf {
        self.dir.join("public-tls")
    }

    /// The edge's process id.
    pub fn edge_pid(&self) -> Option<u32> {
        self.edge_proc.as_ref().map(Child::id)
    }

    /// Stops the edge with SIGTERM, as a service manager does, and waits.
    pub async fn stop_edge(&mut self) -> Result<()> {
        if let Some(mut c) = self.edge_proc.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() {
                anyhow::ensure!(Instant::now() < deadline, "the edge ignored SIGTERM");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    pub async fn edge_metric(&self, name: &str) -> Result<f64> {
        self.metric_at(self.edge_admin, name).await
    }

    pub fn start_edge(&mut self) -> Result<()> {
        let tls = self.opts.edge_tls.then_some(self.edge_tls);
        let child = self.spawn_edge("edge-1", self.edge, self.edge_admin, tls)?;
        self.edge_proc = Some(child);
        Ok(())
    }

    /// An edge process `edge_id` (plain listener `listen`, metrics on
    /// `admin`, TLS with the test's wildcard on `tls` when given), watching
    /// every scheduler, logging to `logs/<edge_id>.log`; the caller owns it.
    pub fn spawn_edge(
        &self,
        edge_id: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        tls: Option<SocketAddr>,
    ) -> Result<Child> {
        let log = if edge_id == "edge-1" { "edge" } else { edge_id };
        if edge_id != "edge-1" {
            // Its own identity, next to edge-1's.
            let st = Command::new(self.scheduler_bin())
                .args(["pki", "issue", "--kind", "edge", "--id", edge_id])
                .arg("--data-dir")
                .arg(self.dir.join("scheduler"))
                .arg("--out")
                .arg(self.dir.join("tls"))
                .stdout(Stdio::null())
                .status()?;
            anyhow::ensure!(st.success(), "issuing a certificate for {edge_id} failed");
        }
        Command::new(bin_dir().join("clawdeploy-edge"))
            .args([
                "--edge-id",
                edge_id,
                "--listen",
                &listen.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .args([
                "--scheduler-url",
                &self.scheduler_urls(edge_id),
                "--scheduler-name",
                "localhost",
            ])
            .arg("--tls-dir")
            .arg(self.dir.join("tls"))
            .arg("--route-cache")
            .arg(self.dir.join(format!("{edge_id}-routes.json")))
            .args(match tls {
                Some(addr) => {
                    let pki = self.public_tls_dir();
                    vec![
                        "--tls-listen".to_owned(),
                        addr.to_string(),
                        "--tls-cert".to_owned(),
                        pki.join("edge.crt.pem").display().to_string(),
                        "--tls-key".to_owned(),
                        pki.join("edge.key.pem").display().to_string(),
                        "--cert-check-secs".to_owned(),
                        "1".to_owned(),
                    ]
                }
                None => Vec::new(),
            })
            .args(&self.opts.edge_args)
            .env(
                "RUST_LOG",
                std::env::var("CLAWDEPLOY_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(self.log_file(log)?)
            .stderr(self.log_file(log)?)
            .spawn()
            .context("starting an edge")
    }

    /// SIGKILLs scheduler 0: the process gets no chance to clean up.
    pub fn kill_scheduler(&mut self) {
        self.kill_scheduler_n(0)
    }

    pub fn kill_scheduler_n(&mut self, i: usize) {
        if let Some(mut c) = self.schedulers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOPs (`stop`) or SIGCONTs node `i`'s agent: a hung agent that
    /// keeps its connections but answers nothing.
    pub fn pause_agent(&self, i: usize, stop: bool) -> Result<()> {
        let pid = self.agents[i].as_ref().context("agent not running")?.id();
        let sig = if stop { "-STOP" } else { "-CONT" };
        let st = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        anyhow::ensure!(st.success(), "kill {sig} {pid} failed");
        Ok(())
    }

    /// One Prometheus sample from scheduler `i` (0 when absent).
    pub async fn scheduler_metric(&self, i: usize, name: &str) -> Result<f64> {
        self.metric_at(self.https[i], name).await
    }

    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut v = Vec::new();
        for (i, c) in self.schedulers.iter().enumerate() {
            if let Some(c) = c {
                let name = if i == 0 {
                    "scheduler".to_owned()
                } else {
                    format!("scheduler{i}")
                };
                v.push((name, c.id()));
            }
        }
        for (i, a) in self.agents.iter().enumerate() {
            if let Some(c) = a {
                v.push((self.node_ids[i].clone(), c.id()));
            }
        }
        if let Some(c) = &self.edge_proc {
            v.push(("edge".into(), c.id()));
        }
        v
    }

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

    /// Every node has a fresh heartbeat.
    pub async fn wait_nodes_connected(&self, within: Duration) -> Result<()> {
        let n = self.node_ids.len() as i64;
        wait_for(within, "all agents connected", || async {
            let live: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE state = 'active' AND last_heartbeat > now() - interval '5 seconds'")
                .fetch_one(&self.db)
                .await
                .unwrap_or(0);
            Ok(live >= n)
        })
        .await
    }

    pub async fn idle_by_node(&self) -> Result<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT node_id, count(*) FROM containers WHERE state = 'idle' GROUP BY node_id",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.db).await?)
    }

    /// Waits until at least `n` containers are idle.
    pub async fn wait_idle_at_least(&self, n: i64, within: Duration) -> Result<()> {
        wait_for(within, &format!("at least {n} idle containers"), || async {
            Ok(self.idle_by_node().await?.values().sum::<i64>() >= n)
        })
        .await
    }

    /// Waits until exactly `n` containers are idle; with `spread`, on every node.
    pub async fn wait_idle(
        &self,
        n: i64,
        spread: bool,
        within: Duration,
    ) -> Result<HashMap<String, i64>> {
        wait_for(
            within,
            &format!(
                "{n} idle containers{}",
                if spread { " on every node" } else { "" }
            ),
            || async {
                let by_node = self.idle_by_node().await?;
                let total: i64 = by_node.values().sum();
                let all_nodes = self
                    .node_ids
                    .iter()
                    .all(|id| by_node.get(id).copied().unwrap_or(0) > 0);
                Ok(total == n && (!spread || all_nodes))
            },
        )
        .await?;
        self.idle_by_node().await
    }

    pub async fn register(&self, email: &str) -> Result<String> {
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

    /// Docker ids of the running containers of this cluster's nodes.
    pub fn docker_running(&self) -> Vec<String> {
        self.node_ids
            .iter()
            .flat_map(|node| {
                let out = Command::new("docker")
                    .args([
                        "ps",
                        "-q",
                        "--no-trunc",
                        "--filter",
                        &format!("label=clawdeploy.node={node}"),
                    ])
                    .output();
                out.map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            })
            .collect()
    }

    /// Waits until Docker runs exactly as many of this cluster's containers
    /// as the database holds idle or assigned.
    pub async fn wait_docker_matches_db(&self, within: Duration) -> Result<()> {
        wait_for(within, "Docker to run what the database wants", || async {
            let want = self
                .count("SELECT count(*) FROM containers WHERE state IN ('idle', 'assigned')")
                .await?;
            Ok(self.docker_running().len() as i64 == want)
        })
        .await
    }

    pub fn docker_inspect(&self, docker_id: &str) -> Result<Value> {
        let out = Command::new("docker")
            .args(["inspect", docker_id])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "docker inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v[0].clone())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut children: Vec<Child> = self
            .schedulers
            .iter_mut()
            .filter_map(Option::take)
            .chain(self.edge_proc.take())
            .collect();
        children.extend(self.agents.iter_mut().filter_map(Option::take));
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Docker may still finish a create the agent sent just before it
        // died; a second pass catches those.
        for pass in 0..2 {
            if pass > 0 {
                std::thread::sleep(Duration::from_millis(500));
            }
            for node in &self.node_ids {
                docker_cleanup_node(node);
            }
        }
        if let Some((i, _)) = self.opts.small_state_disk {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.state_dir(i))
                .status();
        }
        let _ = Command::new("psql")
            .arg(&self.admin_db_url)
            .args([
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !std::thread::panicking()
            && !self.keep_logs
            && std::env::var_os("CLAWDEPLOY_KEEP_LOGS").is_none()
        {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "cluster {} failed; logs kept in {}",
                self.name,
                self.dir.join("logs").display()
            );
        }
    }
}

/// Debian's libfaketime (package `libfaketime`, with `faketime`).
fn libfaketime() -> Result<PathBuf> {
    std::fs::read_dir("/usr/lib")?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .context("libfaketime.so.1 is not installed (Debian's faketime)")
}

/// The value of the first Prometheus sample named `name`: a bare name
/// matches any labels, a name with `{labels}` matches them exactly.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            if name.contains('{') {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' '))
            } else {
                l.split([' ', '{']).next() == Some(name)
            }
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Removes the containers, volumes and networks an agent with this node id made.
pub fn docker_cleanup_node(node: &str) {
    let filter = format!("label=clawdeploy.node={node}");
    // (how to list them, how to remove them), containers first: volumes and
    // networks in use cannot be removed.
    let kinds: [(&[&str], &[&str]); 3] = [
        (&["ps", "-aq"], &["rm", "-f"]),
        (&["volume", "ls", "-q"], &["volume", "rm", "-f"]),
        (&["network", "ls", "-q"], &["network", "rm"]),
    ];
    for (list, remove) in kinds {
        let ids: Vec<String> = Command::new("docker")
            .args(list)
            .args(["--filter", &filter])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(remove)
                .args(&ids)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Polls `check` every 50 ms until it returns true or `within` passes.
pub async fn wait_for<F, Fut>(within: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident memory of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory of a process, from /proc.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) a process has used, from /proc.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    cpu_split_secs(pid).map(|c| c.user + c.kernel)
}

/// A process's CPU time, in seconds, split by where it was spent.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSplit {
    pub user: f64,
    /// In the kernel on the process's behalf (its system calls, and the
    /// network stack work they do).
    pub kernel: f64,
}

/// CPU time a process has used in user space and in the kernel, from /proc.
pub fn cpu_split_secs(pid: u32) -> Option<CpuSplit> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i)?.parse::<f64>().ok();
    Some(CpuSplit {
        user: ticks(11)? / 100.0,
        kernel: ticks(12)? / 100.0,
    })
}

/// Busy and total CPU time of the whole machine, from /proc/stat.
pub fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / 100.0, total / 100.0)
}

/// CPU seconds used so far by every process on the machine, summed by
/// command name (for attributing a benchmark's load).
pub fn cpu_by_command() -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        // A kernel worker renames itself after the work queue it serves
        // ("kworker/u8:2-ext4-rsv-conversion"): summed under one name, or
        // a rename during a run would count its whole lifetime as new.
        let name = if name.starts_with("kworker/") {
            "kworker".to_owned()
        } else {
            name
        };
        if let Some(secs) = cpu_secs(pid) {
            *out.entry(name.clone()).or_insert(0.0) += secs;
        }
        // Bytes written to storage, in MB, under "<name> (write MB)".
        if let Some(w) = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .and_then(|io| {
                io.lines()
                    .find(|l| l.starts_with("write_bytes:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
        {
            *out.entry(format!("{name} (write MB)")).or_insert(0.0) += w / 1e6;
        }
    }
    out
}

/// Stops a `perf record` (it writes its file on SIGINT), then prints
/// `perf report` of `data` once per `(sort keys, percent limit, lines)`:
/// the benchmarks' profiles.
pub fn perf_report(
    mut recording: std::process::Child,
    data: &std::path::Path,
    views: &[(&str, &str, usize)],
) -> Result<()> {
    let _ = Command::new("kill")
        .args(["-INT", &recording.id().to_string()])
        .status();
    let _ = recording.wait();
    for (sort, limit, lines) in views {
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-g", "none"])
            .args(["--sort", sort, "--percent-limit", limit, "-i"])
            .arg(data)
            .output()?;
        println!("by {sort}:");
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(*lines)
        {
            println!("{line}");
        }
    }
    Ok(())
}

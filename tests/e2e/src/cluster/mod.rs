//! A whole ClawDeploy system for one test: its options, its processes' shared
//! state (the database, addresses, children), starting it and tearing it down
//! (`Drop` kills what it started and drops its database). Spawning and
//! stopping single processes is in `processes.rs`.

mod processes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::PgPool;

use crate::{docker_cleanup_node, edge_client, free_addr, netfault, workspace_root, BASE_DOMAIN};

pub(crate) fn short_id() -> String {
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
    /// More environment for every agent (e.g. `CLAWDEPLOY_TENANT_ALLOW`).
    pub agent_env: Vec<(String, String)>,
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
            agent_env: Vec::new(),
        }
    }
}

pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    pub opts: ClusterOptions,
    pub db_url: String,
    pub(crate) admin_db_url: String,
    pub(crate) db_name: String,
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
    pub(crate) schedulers: Vec<Option<Child>>,
    pub(crate) agents: Vec<Option<Child>>,
    pub(crate) edge_proc: Option<Child>,
    pub client: reqwest::Client,
    /// Set when start-up failed: the logs are kept for the post-mortem.
    pub(crate) keep_logs: bool,
    /// By node id or edge id, with `relays`.
    pub(crate) relays: HashMap<String, netfault::Relay>,
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
    pub(crate) async fn boot(&mut self) -> Result<()> {
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

    pub(crate) fn issue_certs(&self) -> Result<()> {
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

    pub(crate) fn log_file(&self, name: &str) -> Result<Stdio> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{name}.log")))?;
        Ok(Stdio::from(f))
    }

    /// Node `i`'s agent's state directory (ledger, tenant volumes).
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.node_ids[i])
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// The edge's public certificate, key and the CA that signed them.
    pub fn public_tls_dir(&self) -> PathBuf {
        self.dir.join("public-tls")
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

    /// The relay between `who` (a node id, or `edge-1`) and the scheduler,
    /// with `relays`.
    pub fn relay(&self, who: &str) -> &netfault::Relay {
        &self.relays[who]
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

//! Starting, stopping, pausing and killing one of a cluster's processes:
//! schedulers, node agents (with a moved clock, a small disk), the edge.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{bin_dir, free_addr, Cluster, ADMIN_TOKEN};

impl Cluster {
    pub(crate) fn scheduler_bin(&self) -> PathBuf {
        bin_dir().join("clawdeploy-scheduler")
    }

    /// (Re)starts scheduler 0.
    pub fn start_scheduler(&mut self) -> Result<()> {
        self.start_scheduler_n(0)
    }

    /// All schedulers' gRPC URLs, comma-separated, for the agent or edge
    /// `who`: its relay's when it has one.
    pub(crate) fn scheduler_urls(&self, who: &str) -> String {
        if let Some(r) = self.relays.get(who) {
            return format!("https://{}", r.addr);
        }
        let urls: Vec<String> = self.grpcs.iter().map(|a| format!("https://{a}")).collect();
        urls.join(",")
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
    pub(crate) fn spawn_agent(
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
        cmd.envs(self.opts.agent_env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
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
}

/// Debian's libfaketime (package `libfaketime`, with `faketime`).
pub(crate) fn libfaketime() -> Result<PathBuf> {
    std::fs::read_dir("/usr/lib")?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .context("libfaketime.so.1 is not installed (Debian's faketime)")
}

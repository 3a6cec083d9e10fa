//! One container's worker: it owns that container's lifecycle (create or
//! adopt, start, health, resize, suspend, tenant config, state archives)
//! and reports it on the status board, backing off after a setback.

use std::sync::Arc;
use std::time::Duration;

use clawdeploy_proto::{
    ArchiveExport, ArchiveReport, ContainerPhase, ContainerStatus, DesiredContainer, TenantConfig,
};
use serde_json::json;
use tokio::sync::watch;

use clawdeploy_common::Backoff;

use super::board::StatusBoard;
use super::slots::CreateSlots;
use crate::crash_point;
use crate::probe::GatewayProbe;
use crate::runtime::transfer::{Archive, Transfers};
use crate::runtime::{ContainerRuntime, ContainerSpec, Limits, GATEWAY_PORT};

/// Why a pass could not bring a container where it should be.
enum Setback {
    /// Docker did not answer: nothing is known about the container, so
    /// nothing is reported; the pass is retried.
    DockerDown(String),
    /// The container itself is not as it should be.
    Failed(String),
}

impl From<crate::error::Error> for Setback {
    fn from(e: crate::error::Error) -> Self {
        if e.docker_unavailable() {
            Setback::DockerDown(e.to_string())
        } else {
            Setback::Failed(e.to_string())
        }
    }
}

/// How often idle containers are re-checked, and the health failure threshold.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(2);
const UNHEALTHY_AFTER: u32 = 3;

pub(super) struct Worker<R, P> {
    pub(super) runtime: Arc<R>,
    pub(super) creates: Arc<CreateSlots>,
    pub(super) prober: P,
    pub(super) board: Arc<StatusBoard>,
    pub(super) generation: u64,
    pub(super) transfers: Option<Arc<Transfers>>,
}

fn limits_of(d: &DesiredContainer) -> Limits {
    let r = d.resources.unwrap_or_default();
    Limits {
        cpu_millis: r.cpu_millis,
        memory_bytes: r.memory_bytes,
        pids: r.pids,
    }
}

fn spec_of(d: &DesiredContainer, generation: u64) -> ContainerSpec {
    ContainerSpec {
        container_id: d.container_id.clone(),
        image: d.image.clone(),
        gateway_token: d.gateway_token.clone(),
        limits: limits_of(d),
        generation,
    }
}

/// The hot-reloadable part of `openclaw.json` that assignment owns. With
/// a metering proxy each provider is an OpenAI-compatible entry on the
/// proxy (`baseUrl`, the instance's proxy token as `apiKey`); its name
/// stays, so models keep theirs (`openai/gpt-4o`).
pub fn tenant_config_json(t: &TenantConfig) -> Vec<u8> {
    let providers: serde_json::Map<String, serde_json::Value> = if t.providers.is_empty() {
        t.provider_keys
            .iter()
            .map(|(name, key)| (name.clone(), json!({ "apiKey": key })))
            .collect()
    } else {
        t.providers
            .iter()
            .map(|(name, p)| {
                let entry = json!({"baseUrl": p.base_url, "apiKey": p.api_key, "api": "openai-completions"});
                (name.clone(), entry)
            })
            .collect()
    };
    let doc = json!({
        "meta": {"managedBy": "clawdeploy", "instanceId": t.instance_id, "configVersion": t.config_version},
        "models": {"providers": providers},
        "agents": {"defaults": {"model": {"primary": t.default_model}}},
    });
    serde_json::to_vec_pretty(&doc).unwrap_or_default()
}

/// What a worker knows of its container between passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// Not checked since the last change or failure: the next pass asks
    /// the runtime (adopts, starts or creates it).
    Unverified,
    /// Running and answering, under these limits. A spec change that only
    /// carries tenant config goes straight to the config write.
    Running(Limits),
}

/// A worker's progress: what it reported, what it knows and applied, and
/// how long it waits after a setback.
struct Progress {
    status: ContainerStatus,
    known: Known,
    /// The tenant config version proven live.
    applied_config: u64,
    /// Health probes failed in a row.
    failed_probes: u32,
    backoff: Backoff,
}

const BACKOFF_START: Duration = Duration::from_millis(200);
/// The longest waits after a failed resize or config write, and while
/// Docker does not answer; a container that fails waits up to the
/// backoff's own cap (30 s).
const RETRY_CAP: Duration = Duration::from_secs(10);
const DOCKER_DOWN_CAP: Duration = Duration::from_secs(5);

impl<R: ContainerRuntime, P: GatewayProbe> Worker<R, P> {
    pub(super) async fn run(self, mut rx: watch::Receiver<DesiredContainer>) {
        let mut p = Progress {
            status: ContainerStatus {
                container_id: rx.borrow().container_id.clone(),
                ..Default::default()
            },
            known: Known::Unverified,
            applied_config: 0,
            failed_probes: 0,
            backoff: Backoff::new(BACKOFF_START, Duration::from_secs(30)),
        };
        loop {
            let desired = rx.borrow_and_update().clone();
            let id = desired.container_id.clone();
            if desired.stopped {
                // Suspended: stopped, volume kept, no probing until resumed.
                p.known = Known::Unverified;
                if let Err(setback) = self.ensure_stopped(&id, &mut p.status).await {
                    self.setback(&mut p, setback).await;
                    continue;
                }
                p.backoff.reset();
                if let Some(export) = desired.export.as_ref().filter(|e| {
                    p.status
                        .export
                        .as_ref()
                        .is_none_or(|r| r.archive_id != e.archive_id)
                }) {
                    p.status.export = Some(self.export(&id, export).await);
                    self.board.set(p.status.clone());
                }
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let limits = match p.known {
                Known::Running(limits) => limits,
                Known::Unverified => match self.bring_up(&desired, &mut p).await {
                    Ok(limits) => limits,
                    Err(setback) => {
                        self.setback(&mut p, setback).await;
                        continue;
                    }
                },
            };
            p.known = Known::Running(limits);

            // A tier change: new limits applied live, no restart.
            let want = limits_of(&desired);
            if want != Limits::default() && want != limits {
                match self.runtime.update(&id, want).await {
                    Ok(()) => {
                        tracing::info!(container_id = id, ?want, "container resized in place");
                        p.known = Known::Running(want);
                    }
                    Err(e) => {
                        metrics::counter!("clawdeploy_agent_reconcile_errors_total", "step" => "update").increment(1);
                        tracing::warn!(container_id = id, error = %e, "resize failed; retrying");
                        p.known = Known::Unverified;
                        p.backoff.wait_capped(RETRY_CAP).await;
                        continue;
                    }
                }
            }

            // Tenant config: written atomically, then proven live with the
            // container's own token before it is reported.
            if let Some(t) = desired
                .tenant
                .as_ref()
                .filter(|t| t.config_version > p.applied_config)
            {
                match self
                    .apply_tenant(&id, &p.status.upstream, &desired.gateway_token, t)
                    .await
                {
                    Ok(()) => {
                        crash_point("report");
                        p.applied_config = t.config_version;
                        p.status.config_version = p.applied_config;
                        self.board.set(p.status.clone());
                    }
                    Err(e) => {
                        metrics::counter!("clawdeploy_agent_reconcile_errors_total", "step" => "config").increment(1);
                        tracing::warn!(container_id = id, error = %e, "tenant config not confirmed; retrying");
                        p.known = Known::Unverified;
                        p.backoff.wait_capped(RETRY_CAP).await;
                        continue;
                    }
                }
            }

            // Wait for a change, probing health meanwhile. A failed probe
            // sends the next pass to Docker (a crashed container is started
            // again); repeated failures mark the container unhealthy.
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(CHECK_EVERY) => self.check_health(&id, &mut p).await,
            }
        }
    }

    /// Adopts, starts or creates the container and waits until its gateway
    /// answers; returns the limits Docker enforces.
    async fn bring_up(
        &self,
        desired: &DesiredContainer,
        p: &mut Progress,
    ) -> Result<Limits, Setback> {
        let limits = self.ensure_running(desired, &mut p.status).await?;
        // A container Docker restarted may have a new address: report it,
        // so its route follows.
        self.board.set(p.status.clone());
        if p.status.phase != ContainerPhase::Healthy as i32 {
            p.status.phase = ContainerPhase::Starting as i32;
            self.board.set(p.status.clone());
            if !self
                .wait_healthy(&p.status.upstream, Duration::from_secs(30))
                .await
            {
                return Err(Setback::Failed("gateway did not answer /healthz".into()));
            }
            p.status.phase = ContainerPhase::Healthy as i32;
            p.status.message.clear();
            self.board.set(p.status.clone());
        }
        p.backoff.reset();
        Ok(limits)
    }

    async fn check_health(&self, id: &str, p: &mut Progress) {
        if self.prober.healthy(&p.status.upstream).await {
            p.failed_probes = 0;
            if p.status.phase != ContainerPhase::Healthy as i32 {
                p.status.phase = ContainerPhase::Healthy as i32;
                p.status.message.clear();
                self.board.set(p.status.clone());
            }
            return;
        }
        metrics::counter!("clawdeploy_agent_reconcile_errors_total", "step" => "health")
            .increment(1);
        p.failed_probes += 1;
        p.known = Known::Unverified;
        // Unhealthy means running yet not answering: a container Docker
        // cannot vouch for (stopped, or the engine down) is handled by the
        // next pass instead.
        let confirmed = p.failed_probes >= UNHEALTHY_AFTER
            && matches!(self.runtime.inspect(id).await, Ok(Some(o)) if o.running);
        if confirmed {
            p.status.phase = ContainerPhase::Unhealthy as i32;
            p.status.message = format!("/healthz failed {} times", p.failed_probes);
            self.board.set(p.status.clone());
        }
    }

    /// Uploads the stopped container's state where `export` says. Not
    /// retried here: the scheduler decides what a failure means (a
    /// migration rolls back) and asks again with a new archive id.
    async fn export(&self, id: &str, export: &ArchiveExport) -> ArchiveReport {
        let mut report = ArchiveReport {
            archive_id: export.archive_id.clone(),
            ..Default::default()
        };
        let Some(transfers) = &self.transfers else {
            report.error = "this agent has no archive staging".into();
            return report;
        };
        match transfers
            .upload(self.runtime.as_ref(), id, &export.put_url)
            .await
        {
            Ok(Archive { sha256, bytes }) => {
                report.sha256 = sha256;
                report.bytes = bytes;
            }
            Err(e) => {
                tracing::warn!(container_id = id, error = %e, "state export failed");
                report.error = e.to_string();
            }
        }
        report
    }

    /// Fills a not-yet-created container's state volume from the archive
    /// the desired state names, if any.
    async fn import(&self, desired: &DesiredContainer) -> Result<(), Setback> {
        let Some(import) = &desired.import else {
            return Ok(());
        };
        let Some(transfers) = &self.transfers else {
            return Err(Setback::Failed(
                "import: this agent has no archive staging".into(),
            ));
        };
        let expected = Archive {
            sha256: import.sha256.clone(),
            bytes: import.bytes,
        };
        transfers
            .download(
                self.runtime.as_ref(),
                &desired.container_id,
                &import.get_url,
                &expected,
            )
            .await
            .map_err(|e| Setback::Failed(format!("import: {e}")))
    }

    /// Stops a running container for suspension and reports it stopped.
    async fn ensure_stopped(&self, id: &str, status: &mut ContainerStatus) -> Result<(), Setback> {
        let Some(observed) = self.runtime.inspect(id).await? else {
            return Err(Setback::Failed("suspended container is missing".into()));
        };
        if observed.running {
            tracing::info!(container_id = id, "stopping suspended container");
            self.runtime.stop(id).await?;
        }
        status.docker_id = observed.docker_id;
        status.phase = ContainerPhase::Stopped as i32;
        status.message.clear();
        self.board.set(status.clone());
        Ok(())
    }

    /// Adopts a running container, starts a stopped one, creates a missing
    /// one; fills in the status's Docker id and upstream and returns the
    /// limits Docker enforces.
    async fn ensure_running(
        &self,
        desired: &DesiredContainer,
        status: &mut ContainerStatus,
    ) -> Result<Limits, Setback> {
        let id = &desired.container_id;
        let observed = match self.runtime.inspect(id).await {
            Ok(Some(o)) if o.running => Ok(o),
            Ok(Some(o)) => {
                tracing::info!(
                    container_id = id,
                    status = o.status,
                    "starting stopped container"
                );
                status.phase = ContainerPhase::Starting as i32;
                match self.runtime.start(id).await {
                    Ok(()) => self
                        .runtime
                        .inspect(id)
                        .await
                        .map(Option::unwrap_or_default),
                    Err(e) => Err(e),
                }
            }
            Ok(None) => {
                status.phase = ContainerPhase::Creating as i32;
                self.board.set(status.clone());
                // A container made from an archive gets its state first; a
                // failed import creates nothing.
                self.import(desired).await?;
                let _permit = self.creates.acquire(desired.tenant.is_some()).await;
                self.runtime
                    .create_and_start(&spec_of(desired, self.generation))
                    .await
            }
            Err(e) => Err(e),
        };
        match observed {
            Ok(o) => match o.ip.clone() {
                Some(ip) => {
                    status.docker_id = o.docker_id.clone();
                    status.upstream = format!("{ip}:{GATEWAY_PORT}");
                    Ok(o.limits())
                }
                None => Err(Setback::Failed(format!(
                    "container has no address ({})",
                    o.status
                ))),
            },
            Err(e) => {
                metrics::counter!("clawdeploy_agent_reconcile_errors_total", "step" => "ensure")
                    .increment(1);
                Err(e.into())
            }
        }
    }

    async fn setback(&self, p: &mut Progress, setback: Setback) {
        match setback {
            Setback::Failed(message) => {
                tracing::warn!(
                    container_id = p.status.container_id,
                    message,
                    "container not running"
                );
                p.status.phase = ContainerPhase::Failed as i32;
                p.status.message = message;
                self.board.set(p.status.clone());
                p.backoff.wait().await;
            }
            Setback::DockerDown(message) => {
                tracing::warn!(
                    container_id = p.status.container_id,
                    message,
                    "Docker unavailable; keeping the last known state and retrying"
                );
                p.backoff.wait_capped(DOCKER_DOWN_CAP).await;
            }
        }
    }

    async fn wait_healthy(&self, upstream: &str, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.prober.healthy(upstream).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    async fn apply_tenant(
        &self,
        id: &str,
        upstream: &str,
        token: &str,
        t: &TenantConfig,
    ) -> crate::error::Result<()> {
        let started = std::time::Instant::now();
        self.runtime
            .write_config(id, &tenant_config_json(t))
            .await?;
        crash_point("config");
        let want: std::collections::BTreeSet<String> = t
            .provider_keys
            .keys()
            .chain(t.providers.keys())
            .cloned()
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.prober.live_providers(upstream, token).await {
                Ok(live) if live == want => break,
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Ok(live) => {
                    return Err(crate::error::Error::Probe(format!(
                        "gateway shows providers {live:?}, wanted {want:?}"
                    )))
                }
                Err(e) => return Err(e),
            }
        }
        metrics::histogram!("clawdeploy_agent_config_apply_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            container_id = id,
            version = t.config_version,
            took_ms = started.elapsed().as_millis() as u64,
            "tenant config live"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_config_holds_only_hot_reloadable_sections() {
        let t = TenantConfig {
            instance_id: "i-1".into(),
            config_version: 3,
            provider_keys: [("openai".to_owned(), "sk-1".to_owned())].into(),
            default_model: "openai/gpt-4o".into(),
            providers: Default::default(),
        };
        let v: serde_json::Value = serde_json::from_slice(&tenant_config_json(&t)).unwrap();
        // `gateway.*` needs a restart: assignment never writes it.
        assert!(v.get("gateway").is_none());
        assert_eq!(v["models"]["providers"]["openai"]["apiKey"], "sk-1");
        assert_eq!(v["agents"]["defaults"]["model"]["primary"], "openai/gpt-4o");
        assert_eq!(v["meta"]["configVersion"], 3);
    }

    #[test]
    fn behind_the_proxy_a_provider_keeps_its_name_and_holds_no_key() {
        let proxied = clawdeploy_proto::ProviderEndpoint {
            base_url: "http://proxy:4319/p/openai/v1".into(),
            api_key: "cdp_x_y".into(),
        };
        let t = TenantConfig {
            instance_id: "i-1".into(),
            config_version: 4,
            provider_keys: Default::default(),
            default_model: "openai/gpt-4o".into(),
            providers: [("openai".to_owned(), proxied)].into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&tenant_config_json(&t)).unwrap();
        let openai = &v["models"]["providers"]["openai"];
        assert_eq!(openai["baseUrl"], "http://proxy:4319/p/openai/v1");
        assert_eq!(openai["apiKey"], "cdp_x_y");
        assert_eq!(openai["api"], "openai-completions");
    }
}

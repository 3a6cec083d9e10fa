//! The real container runtime: the Docker Engine API over its unix socket
//! (bollard), with each call bounded in time and timed.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bollard::models::{
    ContainerCreateBody, ContainerUpdateBody, EndpointSettings, HostConfig, Ipam, IpamConfig,
    NetworkCreateRequest, NetworkingConfig, RestartPolicy, RestartPolicyNameEnum,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    RemoveVolumeOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;

use super::{
    ContainerRuntime, ContainerSpec, Limits, Observed, LABEL_CONTAINER, LABEL_GENERATION,
    LABEL_NODE, TENANT_UID,
};
use crate::error::{Error, Result};

pub struct DockerRuntime {
    docker: Docker,
    node_id: String,
    network: String,
    subnet: Option<String>,
    pub(super) volumes_dir: PathBuf,
}

fn container_name(container_id: &str) -> String {
    format!("clawdeploy-{container_id}")
}

/// How long one Docker call may take before the engine counts as
/// unavailable: a daemon that is restarting can hold calls for minutes.
fn op_timeout(op: &str) -> std::time::Duration {
    match op {
        "create" | "create_volume" | "start" | "stop" | "remove" | "remove_volume" | "update"
        | "create_network" => std::time::Duration::from_secs(60),
        _ => std::time::Duration::from_secs(15),
    }
}

/// Runs one Docker call with a deadline and records its latency. Transport
/// failures and timeouts become `DockerUnavailable`; answers from the engine
/// (404, 409, 500) stay `Docker`.
async fn timed<T>(
    op: &'static str,
    fut: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T> {
    use bollard::errors::Error as B;
    let started = Instant::now();
    let r = tokio::time::timeout(op_timeout(op), fut).await;
    metrics::histogram!("clawdeploy_agent_docker_op_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    let unavailable = |message: String| {
        metrics::counter!("clawdeploy_agent_docker_unavailable_total", "op" => op).increment(1);
        Error::DockerUnavailable { op, message }
    };
    match r {
        Err(_) => Err(unavailable(format!(
            "no answer within {:?}",
            op_timeout(op)
        ))),
        Ok(Ok(v)) => Ok(v),
        Ok(Err(
            e @ (B::RequestTimeoutError
            | B::IOError { .. }
            | B::HyperResponseError { .. }
            | B::HyperLegacyError { .. }
            | B::SocketNotFoundError(_)),
        )) => Err(unavailable(e.to_string())),
        // The engine answered: keep its status code.
        Ok(Err(B::DockerResponseServerError {
            status_code,
            message,
        })) => Err(Error::Docker {
            op,
            status: Some(status_code),
            message,
        }),
        Ok(Err(e)) => Err(Error::Docker {
            op,
            status: None,
            message: e.to_string(),
        }),
    }
}

impl DockerRuntime {
    /// Connects to the engine's unix socket and negotiates the API version
    /// (the engine may be older than bollard's default).
    pub async fn connect(
        socket: &str,
        node_id: &str,
        network: String,
        subnet: Option<String>,
        volumes_dir: PathBuf,
    ) -> Result<Self> {
        let docker = Docker::connect_with_socket(socket, 120, bollard::API_DEFAULT_VERSION)
            .map_err(|e| Error::Docker {
                op: "connect",
                status: None,
                message: e.to_string(),
            })?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| Error::Docker {
                op: "version",
                status: None,
                message: e.to_string(),
            })?;
        std::fs::create_dir_all(&volumes_dir)?;
        Ok(Self {
            docker,
            node_id: node_id.to_owned(),
            network,
            subnet,
            volumes_dir,
        })
    }

    pub(super) fn volume_dir(&self, container_id: &str) -> PathBuf {
        self.volumes_dir.join(container_id)
    }

    fn observed(
        &self,
        container_id: &str,
        inspect: bollard::models::ContainerInspectResponse,
    ) -> Observed {
        let state = inspect.state.unwrap_or_default();
        let host = inspect.host_config.unwrap_or_default();
        let ip = inspect
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(&self.network))
            .and_then(|e| e.ip_address)
            .filter(|ip| !ip.is_empty());
        Observed {
            container_id: container_id.to_owned(),
            docker_id: inspect.id.unwrap_or_default(),
            running: state.running.unwrap_or(false),
            ip,
            status: state.status.map(|s| s.to_string()).unwrap_or_default(),
            cpu_millis: (host.nano_cpus.unwrap_or(0) / 1_000_000) as u32,
            memory_bytes: host.memory.unwrap_or(0) as u64,
            pids: host.pids_limit.unwrap_or(0) as u32,
            started_at: state.started_at.unwrap_or_default(),
        }
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn export_state<W: tokio::io::AsyncWrite + Unpin + Send>(
        &self,
        container_id: &str,
        out: &mut W,
    ) -> Result<u64> {
        self.export_volume(container_id, out).await
    }

    async fn import_state<I: tokio::io::AsyncRead + Unpin + Send>(
        &self,
        container_id: &str,
        input: I,
    ) -> Result<()> {
        self.import_volume(container_id, input).await
    }

    async fn prepare(&self) -> Result<()> {
        let bridge = crate::firewall::bridge_name(&self.network);
        if let Ok(existing) = timed(
            "inspect_network",
            self.docker.inspect_network(&self.network, None),
        )
        .await
        {
            // A network made before the firewall's bridge naming would
            // escape its rules: refuse rather than run tenants unisolated.
            let named = existing
                .options
                .unwrap_or_default()
                .get("com.docker.network.bridge.name")
                .cloned();
            if named.as_deref() != Some(bridge.as_str()) {
                return Err(Error::Docker {
                    op: "prepare",
                    status: None,
                    message: format!(
                        "network {} uses bridge {named:?}, not {bridge}: remove it so the agent can recreate it isolated",
                        self.network
                    ),
                });
            }
            return Ok(());
        }
        let labels = HashMap::from([(LABEL_NODE.to_owned(), self.node_id.clone())]);
        // Containers on the node network cannot talk to each other (ICC off);
        // the host (agent, edge) reaches them directly.
        // The bridge's name puts it under the firewall's wildcard rules.
        let options = HashMap::from([
            (
                "com.docker.network.bridge.enable_icc".to_owned(),
                "false".to_owned(),
            ),
            ("com.docker.network.bridge.name".to_owned(), bridge.clone()),
        ]);
        let ipam = self.subnet.as_ref().map(|s| Ipam {
            config: Some(vec![IpamConfig {
                subnet: Some(s.clone()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let req = NetworkCreateRequest {
            name: self.network.clone(),
            driver: Some("bridge".into()),
            options: Some(options),
            labels: Some(labels),
            ipam,
            ..Default::default()
        };
        match timed("create_network", self.docker.create_network(req)).await {
            Ok(_) => {
                tracing::info!(
                    network = self.network,
                    bridge,
                    "created tenant network (inter-container traffic disabled)"
                );
                Ok(())
            }
            // Another agent sharing the engine may have raced us.
            Err(e) if e.status() == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list(&self) -> Result<Vec<Observed>> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_NODE}={}", self.node_id)],
        )]);
        let list = timed(
            "list",
            self.docker.list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            })),
        )
        .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                Some(Observed {
                    container_id: labels.get(LABEL_CONTAINER)?.clone(),
                    docker_id: c.id.unwrap_or_default(),
                    running: c.state.map(|s| s.to_string() == "running").unwrap_or(false),
                    ip: None,
                    status: c.status.unwrap_or_default(),
                    ..Default::default()
                })
            })
            .collect())
    }

    async fn inspect(&self, container_id: &str) -> Result<Option<Observed>> {
        match timed(
            "inspect",
            self.docker.inspect_container(
                &container_name(container_id),
                None::<InspectContainerOptions>,
            ),
        )
        .await
        {
            Ok(i) => Ok(Some(self.observed(container_id, i))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<Observed> {
        let volume = container_name(&spec.container_id);
        let dir = self.volume_dir(&spec.container_id);
        prepare_volume_dir(&dir)?;
        let labels = HashMap::from([
            (LABEL_CONTAINER.to_owned(), spec.container_id.clone()),
            (LABEL_NODE.to_owned(), self.node_id.clone()),
            (LABEL_GENERATION.to_owned(), spec.generation.to_string()),
        ]);
        // The state volume is a named local volume bound to a directory the
        // agent owns, so the agent can replace the config atomically.
        timed(
            "create_volume",
            self.docker.create_volume(VolumeCreateRequest {
                name: Some(volume.clone()),
                driver: Some("local".into()),
                driver_opts: Some(HashMap::from([
                    ("type".to_owned(), "none".to_owned()),
                    ("o".to_owned(), "bind".to_owned()),
                    ("device".to_owned(), dir.display().to_string()),
                ])),
                labels: Some(labels.clone()),
                ..Default::default()
            }),
        )
        .await?;
        let memory = spec.limits.memory_bytes as i64;
        let host_config = HostConfig {
            binds: Some(vec![format!("{volume}:/home/node/.openclaw")]),
            network_mode: Some(self.network.clone()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                "rw,noexec,nosuid,nodev,size=64m".to_owned(),
            )])),
            memory: Some(memory),
            // Memory = swap: no swap beyond the memory limit.
            memory_swap: Some(memory),
            nano_cpus: Some(i64::from(spec.limits.cpu_millis) * 1_000_000),
            pids_limit: Some(i64::from(spec.limits.pids)),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::ON_FAILURE),
                maximum_retry_count: Some(5),
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            user: Some(format!("{TENANT_UID}:{TENANT_UID}")),
            env: Some(vec![format!(
                "OPENCLAW_GATEWAY_TOKEN={}",
                spec.gateway_token
            )]),
            labels: Some(labels),
            host_config: Some(host_config),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    self.network.clone(),
                    EndpointSettings::default(),
                )])),
            }),
            ..Default::default()
        };
        let name = container_name(&spec.container_id);
        timed(
            "create",
            self.docker.create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            ),
        )
        .await?;
        timed(
            "start",
            self.docker
                .start_container(&name, None::<StartContainerOptions>),
        )
        .await?;
        self.inspect(&spec.container_id)
            .await?
            .ok_or_else(|| Error::Docker {
                op: "inspect",
                status: None,
                message: "container vanished after start".into(),
            })
    }

    async fn start(&self, container_id: &str) -> Result<()> {
        timed(
            "start",
            self.docker
                .start_container(&container_name(container_id), None::<StartContainerOptions>),
        )
        .await
    }

    async fn stop(&self, container_id: &str) -> Result<()> {
        match timed(
            "stop",
            self.docker.stop_container(
                &container_name(container_id),
                Some(StopContainerOptions {
                    t: Some(10),
                    ..Default::default()
                }),
            ),
        )
        .await
        {
            // 304: already stopped.
            Err(e) if e.status() == Some(304) => Ok(()),
            r => r,
        }
    }

    async fn update(&self, container_id: &str, limits: Limits) -> Result<()> {
        let memory = limits.memory_bytes as i64;
        timed(
            "update",
            self.docker.update_container(
                &container_name(container_id),
                ContainerUpdateBody {
                    memory: Some(memory),
                    memory_swap: Some(memory),
                    nano_cpus: Some(i64::from(limits.cpu_millis) * 1_000_000),
                    pids_limit: Some(i64::from(limits.pids)),
                    ..Default::default()
                },
            ),
        )
        .await
        .map(|_| ())
    }

    async fn remove(&self, container_id: &str) -> Result<()> {
        let name = container_name(container_id);
        match timed(
            "remove",
            self.docker.remove_container(
                &name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            ),
        )
        .await
        {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        match timed(
            "remove_volume",
            self.docker
                .remove_volume(&name, Some(RemoveVolumeOptions { force: true })),
        )
        .await
        {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let dir = self.volume_dir(container_id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(())
    }

    async fn write_config(&self, container_id: &str, json: &[u8]) -> Result<()> {
        let dir = self.volume_dir(container_id);
        let json = json.to_vec();
        tokio::task::spawn_blocking(move || {
            clawdeploy_common::fs::write_private_atomically(
                &dir,
                "openclaw.json",
                &json,
                Some(TENANT_UID),
            )
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
        .map_err(Error::Io)
    }
}

/// Creates a state volume's directory (or takes an existing one) as the
/// tenant user's own, closed to everyone else.
pub(super) fn prepare_volume_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(TENANT_UID), Some(TENANT_UID))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

//! The container runtime the reconciler needs, as one narrow trait, and its
//! real implementation over the Docker Engine API (bollard). Tests and the
//! fleet simulation may supply another implementation; the product uses
//! Docker.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, Ipam, IpamConfig, NetworkCreateRequest,
    NetworkingConfig, RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    RemoveVolumeOptions, StartContainerOptions,
};
use bollard::Docker;

use crate::error::{Error, Result};

/// The port every OpenClaw gateway listens on.
pub const GATEWAY_PORT: u16 = 18789;
/// The `node` user of the OpenClaw image.
pub const TENANT_UID: u32 = 1000;

pub const LABEL_CONTAINER: &str = "clawdeploy.container";
pub const LABEL_NODE: &str = "clawdeploy.node";
pub const LABEL_GENERATION: &str = "clawdeploy.generation";

/// What to run for one pool slot.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerSpec {
    pub container_id: String,
    pub image: String,
    pub gateway_token: String,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub pids: u32,
    pub generation: u64,
}

/// What the runtime reports about one of our containers.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub container_id: String,
    pub docker_id: String,
    pub running: bool,
    /// Address on the node's tenant network.
    pub ip: Option<String>,
    pub status: String,
}

pub trait ContainerRuntime: Send + Sync + 'static {
    /// Sets up what all containers need (the node's network).
    fn prepare(&self) -> impl Future<Output = Result<()>> + Send;
    /// Every container carrying this node's label.
    fn list(&self) -> impl Future<Output = Result<Vec<Observed>>> + Send;
    fn inspect(&self, container_id: &str) -> impl Future<Output = Result<Option<Observed>>> + Send;
    /// Creates (with its state volume) and starts the container.
    fn create_and_start(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<Observed>> + Send;
    fn start(&self, container_id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Removes the container and its state volume: the tenant's data is gone.
    fn remove(&self, container_id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Replaces `openclaw.json` in the container's state atomically.
    fn write_config(
        &self,
        container_id: &str,
        json: &[u8],
    ) -> impl Future<Output = Result<()>> + Send;
}

pub struct DockerRuntime {
    docker: Docker,
    node_id: String,
    network: String,
    subnet: Option<String>,
    volumes_dir: PathBuf,
}

fn container_name(container_id: &str) -> String {
    format!("clawdeploy-{container_id}")
}

async fn timed<T>(
    op: &'static str,
    fut: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T> {
    let started = Instant::now();
    let r = fut.await;
    metrics::histogram!("clawdeploy_agent_docker_op_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    r.map_err(|e| Error::Docker {
        op,
        message: e.to_string(),
    })
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Docker { message, .. } if message.contains("404") || message.contains("No such"))
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
                message: e.to_string(),
            })?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| Error::Docker {
                op: "version",
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

    fn volume_dir(&self, container_id: &str) -> PathBuf {
        self.volumes_dir.join(container_id)
    }

    fn observed(
        &self,
        container_id: &str,
        inspect: bollard::models::ContainerInspectResponse,
    ) -> Observed {
        let state = inspect.state.unwrap_or_default();
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
        }
    }
}

fn prepare_volume_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(TENANT_UID), Some(TENANT_UID))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

impl ContainerRuntime for DockerRuntime {
    async fn prepare(&self) -> Result<()> {
        if timed(
            "inspect_network",
            self.docker.inspect_network(&self.network, None),
        )
        .await
        .is_ok()
        {
            return Ok(());
        }
        let labels = HashMap::from([(LABEL_NODE.to_owned(), self.node_id.clone())]);
        // Containers on the node network cannot talk to each other (ICC off);
        // the host (agent, edge) reaches them directly.
        let options = HashMap::from([(
            "com.docker.network.bridge.enable_icc".to_owned(),
            "false".to_owned(),
        )]);
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
                    "created tenant network (inter-container traffic disabled)"
                );
                Ok(())
            }
            // Another agent sharing the engine may have raced us.
            Err(e) if e.to_string().contains("already exists") => Ok(()),
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
            Err(e) if is_not_found(&e) => Ok(None),
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
        let memory = spec.memory_bytes as i64;
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
            nano_cpus: Some(i64::from(spec.cpu_millis) * 1_000_000),
            pids_limit: Some(i64::from(spec.pids)),
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
            Err(e) if is_not_found(&e) => {}
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
            Err(e) if is_not_found(&e) => {}
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
            write_private_atomically(&dir, "openclaw.json", &json, Some(TENANT_UID))
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
    }
}

/// Writes `contents` to `dir/name` as a file only `owner` (or the agent,
/// when `None`) can read: a temporary file in the same directory, fsync,
/// chown, then rename. Readers see the old file or the new one, never half of
/// one. Tenant configs and the ledger both hold secrets.
pub fn write_private_atomically(
    dir: &Path,
    name: &str,
    contents: &[u8],
    owner: Option<u32>,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(uid))?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

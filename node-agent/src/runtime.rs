//! The container runtime the reconciler needs, as one narrow trait, and its
//! real implementation over the Docker Engine API (bollard). Tests and the
//! fleet simulation may supply another implementation; the product uses
//! Docker.

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
    pub limits: Limits,
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
    /// Limits Docker applies now (from inspect; zero from `list`).
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub pids: u32,
    /// When the container's current process started (RFC 3339).
    pub started_at: String,
}

/// Live limits of a container, changed with `docker update`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub pids: u32,
}

impl Observed {
    pub fn limits(&self) -> Limits {
        Limits {
            cpu_millis: self.cpu_millis,
            memory_bytes: self.memory_bytes,
            pids: self.pids,
        }
    }
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
    /// Stops the container (suspension); its state volume stays.
    fn stop(&self, container_id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Changes CPU, memory and pids limits of a running container in place.
    fn update(&self, container_id: &str, limits: Limits)
        -> impl Future<Output = Result<()>> + Send;
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
        Ok(Err(e)) => Err(Error::Docker {
            op,
            message: e.to_string(),
        }),
    }
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

/// State volume export and import (for migration): a tar stream of the
/// volume's directory. Only a stopped (or not yet created) container's
/// volume is copied, so the archive is consistent.
impl DockerRuntime {
    async fn refuse_running(&self, container_id: &str, op: &'static str) -> Result<()> {
        if self.inspect(container_id).await?.is_some_and(|o| o.running) {
            return Err(Error::Docker {
                op,
                message: format!("container {container_id} is running; stop it first"),
            });
        }
        Ok(())
    }

    /// Writes the state volume of `container_id` as a tar archive to `out`;
    /// returns the bytes written.
    pub async fn export_state(
        &self,
        container_id: &str,
        mut out: impl tokio::io::AsyncWrite + Unpin,
    ) -> Result<u64> {
        self.refuse_running(container_id, "export").await?;
        let dir = self.volume_dir(container_id);
        if !dir.is_dir() {
            return Err(Error::Docker {
                op: "export",
                message: format!("no state volume for {container_id}"),
            });
        }
        let mut child = tokio::process::Command::new("tar")
            .args(["--numeric-owner", "-C"])
            .arg(&dir)
            .args(["-cf", "-", "."])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut stdout = child.stdout.take().expect("piped stdout");
        let n = tokio::io::copy(&mut stdout, &mut out).await?;
        tokio::io::AsyncWriteExt::flush(&mut out).await?;
        let done = child.wait_with_output().await?;
        if !done.status.success() {
            return Err(Error::Docker {
                op: "export",
                message: String::from_utf8_lossy(&done.stderr).into_owned(),
            });
        }
        Ok(n)
    }

    /// Replaces the state volume of `container_id` with the tar archive read
    /// from `input`. The container may not exist yet (it is then created on
    /// top of the imported state); a running one is refused.
    pub async fn import_state(
        &self,
        container_id: &str,
        mut input: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<()> {
        self.refuse_running(container_id, "import").await?;
        let dir = self.volume_dir(container_id);
        // Unpacked beside the volume, then swapped in: a broken stream
        // leaves the old state untouched.
        let staging = self.volumes_dir.join(format!(".import-{container_id}"));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        prepare_volume_dir(&staging)?;
        let mut child = tokio::process::Command::new("tar")
            .args(["--numeric-owner", "--no-same-permissions", "-C"])
            .arg(&staging)
            .args(["-xf", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let copied = tokio::io::copy(&mut input, &mut stdin).await;
        drop(stdin);
        let done = child.wait_with_output().await?;
        if let Err(e) = copied {
            std::fs::remove_dir_all(&staging).ok();
            return Err(e.into());
        }
        if !done.status.success() {
            std::fs::remove_dir_all(&staging).ok();
            return Err(Error::Docker {
                op: "import",
                message: String::from_utf8_lossy(&done.stderr).into_owned(),
            });
        }
        // Everything in a tenant's volume belongs to the tenant user.
        let chown = tokio::process::Command::new("chown")
            .args([
                "-R",
                "--no-dereference",
                &format!("{TENANT_UID}:{TENANT_UID}"),
            ])
            .arg(&staging)
            .status()
            .await?;
        if !chown.success() {
            std::fs::remove_dir_all(&staging).ok();
            return Err(Error::Docker {
                op: "import",
                message: "chown of the imported state failed".into(),
            });
        }
        prepare_volume_dir(&staging)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&staging, &dir)?;
        Ok(())
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
            Err(e) if e.to_string().contains("304") => Ok(()),
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

//! The container runtime the reconciler needs, as one narrow trait: the
//! real implementation over Docker (`docker`, with volume export and import
//! in `volume`, and their archives to and from object storage in
//! `transfer`), and an in-memory one (`fake`) for tests without Docker or
//! root and for the fleet simulation.

mod docker;
pub mod fake;
pub mod transfer;
mod volume;

use std::future::Future;

use crate::error::Result;
pub use docker::DockerRuntime;

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
    /// Writes the stopped container's state volume as a tar archive to
    /// `out`; returns the bytes written. A running container is refused.
    fn export_state<W: tokio::io::AsyncWrite + Unpin + Send>(
        &self,
        container_id: &str,
        out: &mut W,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Replaces the state volume of a container that is not running (or
    /// not created yet) with the tar archive read from `input`, whole or
    /// not at all.
    fn import_state<I: tokio::io::AsyncRead + Unpin + Send>(
        &self,
        container_id: &str,
        input: I,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Replaces `openclaw.json` in the container's state atomically.
    fn write_config(
        &self,
        container_id: &str,
        json: &[u8],
    ) -> impl Future<Output = Result<()>> + Send;
}

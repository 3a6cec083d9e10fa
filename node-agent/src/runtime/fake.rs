//! An in-memory container runtime, and the gateway inside each container
//! as a probe would see it: what the reconciler's unit tests and the fleet
//! simulation run on instead of Docker. Failures are injected per
//! operation; every call is counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use super::{ContainerRuntime, ContainerSpec, Limits, Observed, GATEWAY_PORT};
use crate::error::{Error, Result};
use crate::probe::GatewayProbe;

/// One container as the fake engine holds it.
#[derive(Clone, Debug)]
pub struct FakeContainer {
    pub spec: ContainerSpec,
    pub docker_id: String,
    pub running: bool,
    pub ip: String,
    pub limits: Limits,
    /// The last `openclaw.json` written.
    pub config: Option<Vec<u8>>,
    /// Times it was started (created and started counts as one).
    pub starts: u32,
    /// Running, yet its gateway does not answer.
    pub hung: bool,
}

#[derive(Default)]
struct State {
    containers: BTreeMap<String, FakeContainer>,
    next: u32,
    /// The node's tenant network: addresses are `10.<a>.<b>.<n>`.
    net: [u8; 2],
    /// The engine does not answer at all.
    unavailable: bool,
    /// Operation → how many of its next calls fail.
    failures: HashMap<&'static str, u32>,
    /// Operation → calls made.
    calls: HashMap<&'static str, u32>,
    /// Each container's state volume, as the archive bytes it would export.
    volumes: HashMap<String, Vec<u8>>,
}

#[derive(Clone, Default)]
pub struct FakeRuntime {
    state: Arc<Mutex<State>>,
}

impl FakeRuntime {
    /// A runtime whose containers get addresses in `10.<a>.<b>.0/24`, so
    /// that nodes simulated side by side do not share addresses (never
    /// dialled: the fake is its own gateway). The default is `10.0.0.0/24`.
    pub fn on_network(a: u8, b: u8) -> Self {
        let rt = Self::default();
        rt.state.lock().unwrap().net = [a, b];
        rt
    }

    /// The address the `n`-th container (from 0) gets, as an upstream.
    pub fn upstream_of(&self, n: u32) -> String {
        let [a, b] = self.state.lock().unwrap().net;
        format!("10.{a}.{b}.{}:{GATEWAY_PORT}", n % 250 + 2)
    }

    fn enter(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.state.lock().unwrap();
        *s.calls.entry(op).or_default() += 1;
        if s.unavailable {
            return Err(Error::DockerUnavailable {
                op,
                message: "the fake engine is down".into(),
            });
        }
        if let Some(n) = s.failures.get_mut(op).filter(|n| **n > 0) {
            *n -= 1;
            return Err(Error::Docker {
                op,
                status: Some(500),
                message: format!("injected {op} failure"),
            });
        }
        Ok(s)
    }

    /// A container that already runs (as after an agent restart).
    pub fn insert_running(&self, spec: ContainerSpec) {
        let mut s = self.state.lock().unwrap();
        let c = new_container(&mut s, spec);
        s.containers.insert(c.spec.container_id.clone(), c);
    }

    /// The next `n` calls of `op` fail with an engine error.
    pub fn fail_next(&self, op: &'static str, n: u32) {
        self.state.lock().unwrap().failures.insert(op, n);
    }

    /// The engine stops (or starts again) answering.
    pub fn set_unavailable(&self, down: bool) {
        self.state.lock().unwrap().unavailable = down;
    }

    /// The container's process dies (Docker keeps the container).
    pub fn crash(&self, id: &str) {
        if let Some(c) = self.state.lock().unwrap().containers.get_mut(id) {
            c.running = false;
        }
    }

    /// The container keeps running, but its gateway stops answering.
    pub fn hang(&self, id: &str) {
        if let Some(c) = self.state.lock().unwrap().containers.get_mut(id) {
            c.hung = true;
        }
    }

    pub fn container(&self, id: &str) -> Option<FakeContainer> {
        self.state.lock().unwrap().containers.get(id).cloned()
    }

    /// What the container's state volume holds (its archive bytes).
    pub fn volume(&self, id: &str) -> Option<Vec<u8>> {
        self.state.lock().unwrap().volumes.get(id).cloned()
    }

    /// Puts `bytes` into the container's state volume.
    pub fn set_volume(&self, id: &str, bytes: &[u8]) {
        let mut s = self.state.lock().unwrap();
        s.volumes.insert(id.to_owned(), bytes.to_vec());
    }

    pub fn ids(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .containers
            .keys()
            .cloned()
            .collect()
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: &'static str) -> u32 {
        self.state
            .lock()
            .unwrap()
            .calls
            .get(op)
            .copied()
            .unwrap_or(0)
    }
}

fn new_container(s: &mut State, spec: ContainerSpec) -> FakeContainer {
    let n = s.next;
    s.next += 1;
    let [a, b] = s.net;
    FakeContainer {
        docker_id: format!("fake{n:08x}"),
        running: true,
        ip: format!("10.{a}.{b}.{}", n % 250 + 2),
        limits: spec.limits,
        config: None,
        starts: 1,
        hung: false,
        spec,
    }
}

fn observe(c: &FakeContainer) -> Observed {
    Observed {
        container_id: c.spec.container_id.clone(),
        docker_id: c.docker_id.clone(),
        running: c.running,
        ip: Some(c.ip.clone()),
        status: if c.running { "running" } else { "exited" }.into(),
        cpu_millis: c.limits.cpu_millis,
        memory_bytes: c.limits.memory_bytes,
        pids: c.limits.pids,
        started_at: String::new(),
    }
}

fn no_such(op: &'static str, id: &str) -> Error {
    Error::Docker {
        op,
        status: Some(404),
        message: format!("No such container: {id}"),
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn prepare(&self) -> Result<()> {
        self.enter("prepare").map(|_| ())
    }

    async fn list(&self) -> Result<Vec<Observed>> {
        let s = self.enter("list")?;
        Ok(s.containers.values().map(observe).collect())
    }

    async fn inspect(&self, container_id: &str) -> Result<Option<Observed>> {
        let s = self.enter("inspect")?;
        Ok(s.containers.get(container_id).map(observe))
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<Observed> {
        let mut s = self.enter("create")?;
        if s.containers.contains_key(&spec.container_id) {
            return Err(Error::Docker {
                op: "create",
                status: Some(409),
                message: format!("name of {} already in use", spec.container_id),
            });
        }
        let c = new_container(&mut s, spec.clone());
        let o = observe(&c);
        s.containers.insert(spec.container_id.clone(), c);
        Ok(o)
    }

    async fn start(&self, container_id: &str) -> Result<()> {
        let mut s = self.enter("start")?;
        let c = s
            .containers
            .get_mut(container_id)
            .ok_or_else(|| no_such("start", container_id))?;
        if !c.running {
            c.running = true;
            c.hung = false;
            c.starts += 1;
        }
        Ok(())
    }

    async fn stop(&self, container_id: &str) -> Result<()> {
        let mut s = self.enter("stop")?;
        let c = s
            .containers
            .get_mut(container_id)
            .ok_or_else(|| no_such("stop", container_id))?;
        c.running = false;
        Ok(())
    }

    async fn update(&self, container_id: &str, limits: Limits) -> Result<()> {
        let mut s = self.enter("update")?;
        let c = s
            .containers
            .get_mut(container_id)
            .ok_or_else(|| no_such("update", container_id))?;
        c.limits = limits;
        Ok(())
    }

    async fn remove(&self, container_id: &str) -> Result<()> {
        let mut s = self.enter("remove")?;
        s.containers.remove(container_id);
        s.volumes.remove(container_id);
        Ok(())
    }

    async fn export_state<W: tokio::io::AsyncWrite + Unpin + Send>(
        &self,
        container_id: &str,
        out: &mut W,
    ) -> Result<u64> {
        let bytes = {
            let s = self.enter("export")?;
            match s.containers.get(container_id) {
                Some(c) if c.running => {
                    return Err(Error::Archive {
                        op: "export",
                        message: format!("container {container_id} is running; stop it first"),
                    })
                }
                Some(_) => s.volumes.get(container_id).cloned().unwrap_or_default(),
                None => return Err(no_such("export", container_id)),
            }
        };
        tokio::io::AsyncWriteExt::write_all(out, &bytes).await?;
        Ok(bytes.len() as u64)
    }

    async fn import_state<I: tokio::io::AsyncRead + Unpin + Send>(
        &self,
        container_id: &str,
        mut input: I,
    ) -> Result<()> {
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut input, &mut bytes).await?;
        let mut s = self.enter("import")?;
        if s.containers.get(container_id).is_some_and(|c| c.running) {
            return Err(Error::Archive {
                op: "import",
                message: format!("container {container_id} is running; stop it first"),
            });
        }
        s.volumes.insert(container_id.to_owned(), bytes);
        Ok(())
    }

    async fn write_config(&self, container_id: &str, json: &[u8]) -> Result<()> {
        let mut s = self.enter("write_config")?;
        let c = s
            .containers
            .get_mut(container_id)
            .ok_or_else(|| no_such("write_config", container_id))?;
        c.config = Some(json.to_vec());
        Ok(())
    }
}

impl FakeRuntime {
    fn at(&self, upstream: &str) -> Option<FakeContainer> {
        let ip = upstream.strip_suffix(&format!(":{GATEWAY_PORT}"))?;
        let s = self.state.lock().unwrap();
        s.containers.values().find(|c| c.ip == ip).cloned()
    }
}

/// The gateway of each fake container: healthy while it runs (and is not
/// hung); it serves the providers of the last config written, to its own
/// token only.
impl GatewayProbe for FakeRuntime {
    async fn healthy(&self, upstream: &str) -> bool {
        self.at(upstream).is_some_and(|c| c.running && !c.hung)
    }

    async fn live_providers(&self, upstream: &str, token: &str) -> Result<BTreeSet<String>> {
        let c = self
            .at(upstream)
            .filter(|c| c.running && !c.hung)
            .ok_or_else(|| Error::Probe(format!("{upstream} does not answer")))?;
        if c.spec.gateway_token != token {
            return Err(Error::Probe("/v1/models answered 401".into()));
        }
        let config: serde_json::Value = c
            .config
            .as_deref()
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default();
        Ok(config["models"]["providers"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default())
    }
}

//! CPU cgroups for the benchmarks: a process placed in a group of its own,
//! as systemd places a service (`clawdeploy-edge.service`,
//! `nginx.service`) on a real host.
//!
//! Why it matters on a shared benchmark machine: the CPU scheduler shares
//! time between the *entities* at each level of the cgroup tree. Docker puts
//! every container under one group, so a proxy left in the root group
//! competes with the whole of Docker as one thread against one group: each
//! of its threads (and wrk's) weighs as much as every container together.
//! On two cores a thread-per-connection container then waits 10–40 ms for
//! its turn (`perf sched latency`), and whichever proxy is being measured
//! shows those waits as a p99 of 40–200 ms, at random from run to run.
//! With the proxy in a group of its own the container gets its share and the
//! proxy's own latency is what the run shows.

use std::io;
use std::path::{Path, PathBuf};

/// A CPU cgroup made for one benchmark run; removed (its processes moved
/// back to the parent) on drop.
pub struct CpuGroup {
    dir: PathBuf,
    parent: PathBuf,
}

/// The CPU controller's root: cgroup v1's `cpu` hierarchy, or the unified
/// (v2) hierarchy with the `cpu` controller enabled for its children.
fn cpu_root() -> io::Result<PathBuf> {
    let v1 = Path::new("/sys/fs/cgroup/cpu");
    if v1.join("cgroup.procs").exists() {
        return Ok(v1.to_path_buf());
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers"))?;
    if !controllers.split_whitespace().any(|c| c == "cpu") {
        return Err(io::Error::other(
            "the cgroup hierarchy has no cpu controller",
        ));
    }
    std::fs::write(v2.join("cgroup.subtree_control"), "+cpu")?;
    Ok(v2.to_path_buf())
}

impl CpuGroup {
    /// Makes (or reuses, after a run that was killed) the group `name`.
    pub fn create(name: &str) -> io::Result<Self> {
        let parent = cpu_root()?;
        let dir = parent.join(name);
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        Ok(Self { dir, parent })
    }

    /// Moves the process `pid` (all its threads) into the group; the
    /// processes it starts from now on are born in it.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }
}

/// Each named set of processes in a CPU group of its own
/// (`clawdeploy-bench-<name>`), as each would be its own service, or
/// none if any cannot be (no cgroup access): the run then goes on with the
/// processes where they are. Prints which it was.
pub fn own_groups(services: &[(String, Vec<u32>)]) -> Vec<CpuGroup> {
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    let placed = services
        .iter()
        .map(|(name, pids)| {
            let g = CpuGroup::create(&format!("clawdeploy-bench-{name}"))?;
            pids.iter().try_for_each(|pid| g.add(*pid))?;
            Ok(g)
        })
        .collect::<io::Result<Vec<_>>>();
    match placed {
        Ok(groups) => {
            println!("placement: a CPU cgroup each for {}", names.join(", "));
            groups
        }
        Err(e) => {
            println!(
                "placement: {} share the benchmark's cgroup (no CPU group: {e})",
                names.join(", ")
            );
            Vec::new()
        }
    }
}

/// The processes whose command name is `comm` (`postgres`: the server and
/// its backends).
pub fn pids_of(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // A group with processes in it cannot be removed.
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(self.parent.join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

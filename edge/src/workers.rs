//! The edge's workers: one thread per core, each with its own
//! single-threaded tokio runtime and its own `Front` (so its own upstream
//! connection pool). The accept loops hand each connection to the next
//! worker in turn; from then on the connection, its requests, their
//! upstream connections and any WebSocket it becomes live on that one
//! thread. A request is never handed between threads, which on a
//! work-stealing runtime cost a wake-up of another thread (a futex and a
//! context switch) several times per request: the largest cost the profile
//! showed on a cheap route.
//!
//! With `pin`, worker *i* is pinned to the *i*-th CPU the edge may run on
//! (wrapping round): the two workers then never share a core, nor move
//! between cores with their caches left behind. Off by default, as nginx's
//! `worker_cpu_affinity` is: on a host that also runs tenants the
//! scheduler may do better.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::connection::{self, Accepted, Front};

pub struct Workers {
    queues: Vec<mpsc::UnboundedSender<Accepted>>,
    next: AtomicUsize,
}

/// A running worker thread; `join` waits for it to end (after every
/// `Workers` handle is gone and its connections are done or dropped).
pub struct WorkerThread(std::thread::JoinHandle<()>);

impl WorkerThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("an edge worker panicked");
        }
    }
}

impl Workers {
    /// Starts one worker per `Front` given. `stop` flips when the edge
    /// shuts down: a worker then stops taking connections and drops the
    /// ones it serves.
    pub fn start(
        fronts: Vec<Arc<Front>>,
        pin: bool,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<(Arc<Self>, Vec<WorkerThread>)> {
        let cpus = if pin { allowed_cpus()? } else { Vec::new() };
        let mut queues = Vec::with_capacity(fronts.len());
        let mut threads = Vec::with_capacity(fronts.len());
        for (i, front) in fronts.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let stop = stop.clone();
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("edge-worker-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        match pin_current_thread(cpu) {
                            Ok(()) => tracing::info!(worker = i, cpu, "edge worker pinned"),
                            Err(e) => {
                                tracing::warn!(worker = i, cpu, error = %e, "edge worker not pinned")
                            }
                        }
                    }
                    runtime.block_on(work(front, rx, stop))
                })?;
            queues.push(tx);
            threads.push(WorkerThread(thread));
        }
        Ok((
            Arc::new(Self {
                queues,
                next: AtomicUsize::new(0),
            }),
            threads,
        ))
    }

    /// Hands `conn` to the next worker.
    pub fn dispatch(&self, conn: Accepted) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        if self.queues[i].send(conn).is_err() {
            tracing::debug!(worker = i, "worker gone; connection dropped");
        }
    }
}

/// The CPUs the calling thread may run on (its affinity mask: the
/// process's, or a cgroup's cpuset), in order.
fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

/// Lets the calling thread run on `cpu` only.
fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    Ok(rustix::thread::sched_setaffinity(None, &set)?)
}

/// One worker: serves each connection handed to it until its queue closes
/// or the edge stops.
async fn work(
    front: Arc<Front>,
    mut queue: mpsc::UnboundedReceiver<Accepted>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            conn = queue.recv() => match conn {
                Some(conn) => {
                    tokio::spawn(connection::accepted(front.clone(), conn));
                }
                None => break,
            },
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_runs_on_its_cpu_only_and_others_keep_their_mask() {
        let before = allowed_cpus().unwrap();
        assert!(!before.is_empty());
        let last = *before.last().unwrap();
        let pinned = std::thread::spawn(move || {
            pin_current_thread(last).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(pinned, vec![last]);
        assert_eq!(
            allowed_cpus().unwrap(),
            before,
            "only that thread is pinned"
        );
    }
}

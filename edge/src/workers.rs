//! The edge's workers: one thread per core, each with its own
//! single-threaded tokio runtime and its own `Front` (so its own upstream
//! connection pool). The accept loops hand each connection to the next
//! worker in turn; from then on the connection, its requests, their
//! upstream connections and any WebSocket it becomes live on that one
//! thread. A request is never handed between threads, which on a
//! work-stealing runtime cost a wake-up of another thread (a futex and a
//! context switch) several times per request: the largest cost the profile
//! showed on a cheap route.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::server::{self, Accepted, Front};

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
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<(Arc<Self>, Vec<WorkerThread>)> {
        let mut queues = Vec::with_capacity(fronts.len());
        let mut threads = Vec::with_capacity(fronts.len());
        for (i, front) in fronts.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("edge-worker-{i}"))
                .spawn(move || runtime.block_on(work(front, rx, stop)))?;
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
                    tokio::spawn(server::accepted(front.clone(), conn));
                }
                None => break,
            },
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
    }
}

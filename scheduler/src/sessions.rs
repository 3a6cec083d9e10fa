//! Open agent sessions, one per node: how the scheduler reaches an agent to
//! push its desired state. The scheduler never dials nodes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use clawdeploy_proto::SchedulerMessage;
use tokio::sync::mpsc;

pub type Outbound = mpsc::Sender<Result<SchedulerMessage, tonic::Status>>;

#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    open: Mutex<HashMap<String, (u64, Outbound)>>,
}

impl Sessions {
    /// Registers a node's new session, replacing (and so closing) any older
    /// one for the same node. Returns the session's id for `unregister`.
    pub fn register(&self, node_id: &str, tx: Outbound) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap()
            .insert(node_id.to_owned(), (id, tx));
        id
    }

    /// Removes the session only if it is still the current one.
    pub fn unregister(&self, node_id: &str, session_id: u64) {
        let mut open = self.open.lock().unwrap();
        if open.get(node_id).is_some_and(|(id, _)| *id == session_id) {
            open.remove(node_id);
        }
    }

    /// Ends a node's session with `status` (the node was removed).
    pub fn close(&self, node_id: &str, status: tonic::Status) {
        let removed = self.open.lock().unwrap().remove(node_id);
        if let Some((_, tx)) = removed {
            let _ = tx.try_send(Err(status));
        }
    }

    pub fn sender(&self, node_id: &str) -> Option<Outbound> {
        self.open
            .lock()
            .unwrap()
            .get(node_id)
            .map(|(_, tx)| tx.clone())
    }

    pub fn connected(&self) -> usize {
        self.open.lock().unwrap().len()
    }
}

//! What the agent last observed of each container, for the heartbeat: set
//! by the workers, read by the session, which it wakes on every change.

use std::collections::HashMap;
use std::sync::Mutex;

use clawdeploy_proto::ContainerStatus;
use tokio::sync::Notify;

/// Per-container observed state, read by the heartbeat.
#[derive(Default)]
pub struct StatusBoard {
    statuses: Mutex<HashMap<String, ContainerStatus>>,
    /// Signalled on every change so the session sends a heartbeat at once.
    pub changed: Notify,
}

impl StatusBoard {
    pub(super) fn set(&self, status: ContainerStatus) {
        let mut map = self.statuses.lock().unwrap();
        if map.get(&status.container_id) != Some(&status) {
            map.insert(status.container_id.clone(), status);
            drop(map);
            self.changed.notify_one();
        }
    }

    pub(super) fn remove(&self, container_id: &str) {
        if self.statuses.lock().unwrap().remove(container_id).is_some() {
            self.changed.notify_one();
        }
    }

    pub fn snapshot(&self) -> Vec<ContainerStatus> {
        let mut v: Vec<_> = self.statuses.lock().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        v
    }
}

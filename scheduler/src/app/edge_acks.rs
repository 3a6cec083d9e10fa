//! Which route versions the connected edges have applied. A signup is
//! answered once every connected edge routes the new host, so the customer's
//! first request never meets a 404 from an edge that lags behind.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Default)]
pub struct EdgeAcks {
    next_id: Mutex<u64>,
    /// watch id → (edge id, highest version acknowledged)
    watches: Mutex<HashMap<u64, (String, u64)>>,
    changed: Notify,
}

impl EdgeAcks {
    pub fn register(&self, edge_id: &str) -> u64 {
        let id = {
            let mut n = self.next_id.lock().unwrap();
            *n += 1;
            *n
        };
        self.watches
            .lock()
            .unwrap()
            .insert(id, (edge_id.to_owned(), 0));
        metrics::gauge!("clawdeploy_edges_connected")
            .set(self.watches.lock().unwrap().len() as f64);
        id
    }

    pub fn unregister(&self, watch_id: u64) {
        let left = {
            let mut w = self.watches.lock().unwrap();
            w.remove(&watch_id);
            w.len()
        };
        metrics::gauge!("clawdeploy_edges_connected").set(left as f64);
        self.changed.notify_waiters();
    }

    pub fn ack(&self, edge_id: &str, version: u64) {
        for (edge, acked) in self.watches.lock().unwrap().values_mut() {
            if edge == edge_id && version > *acked {
                *acked = version;
            }
        }
        self.changed.notify_waiters();
    }

    fn all_at(&self, version: u64) -> bool {
        self.watches
            .lock()
            .unwrap()
            .values()
            .all(|(_, acked)| *acked >= version)
    }

    /// Waits until every connected edge has applied `version`, at most
    /// `within`. Returns whether they all did.
    pub async fn wait_all(&self, version: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.all_at(version) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.all_at(version);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_every_connected_edge() {
        let acks = std::sync::Arc::new(EdgeAcks::default());
        assert!(
            acks.wait_all(7, Duration::from_millis(10)).await,
            "no edges: nothing to wait for"
        );
        let a = acks.register("a");
        let _b = acks.register("b");
        acks.ack("a", 7);
        assert!(
            !acks.wait_all(7, Duration::from_millis(20)).await,
            "b has not acked"
        );
        let waiter = {
            let acks = acks.clone();
            tokio::spawn(async move { acks.wait_all(7, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        acks.ack("b", 9);
        assert!(waiter.await.unwrap());
        // A disconnected edge no longer holds anyone back.
        acks.unregister(a);
        assert!(acks.wait_all(9, Duration::from_millis(10)).await);
    }
}

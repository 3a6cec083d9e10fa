//! Open agent sessions, one per node: how the scheduler reaches an agent to
//! push its desired state. The scheduler never dials nodes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use clawdeploy_proto::SchedulerMessage;
use tokio::sync::mpsc;

/// What the scheduler sends down an agent's session. The gRPC layer turns
/// it into the stream's items.
#[derive(Debug)]
pub enum Outgoing {
    Message(SchedulerMessage),
    /// The session is refused (the node was removed, or spoke out of
    /// turn); the agent is told why and the stream ends.
    Refused(String),
}

pub type Outbound = mpsc::Sender<Outgoing>;

#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    open: Mutex<HashMap<String, (u64, Outbound)>>,
    /// Nodes with a push that has not read the database yet, and whether
    /// the generation it will read is newer than any sent before (a bump
    /// committed before it, or while it waited).
    pending_pushes: Mutex<HashMap<String, bool>>,
    /// The newest generation sent to each node, and when.
    sent: Mutex<HashMap<String, (u64, std::time::Instant)>>,
    /// Nodes whose background pusher (`desired::announce`) runs, and
    /// whether a change is waiting for its next round.
    announced: Mutex<HashMap<String, bool>>,
}

impl Sessions {
    /// A ticket to push to `node_id`, or `None` when a push that has not
    /// yet read the database is already under way: it will see the
    /// caller's (committed) change too. `bumped`: the caller bumped the
    /// node's generation, so the push will read a new one.
    pub fn begin_push<'a>(&'a self, node_id: &'a str, bumped: bool) -> Option<PushTicket<'a>> {
        let mut pending = self.pending_pushes.lock().unwrap();
        if let Some(under_way) = pending.get_mut(node_id) {
            // It reads after this bump committed.
            *under_way |= bumped;
            return None;
        }
        pending.insert(node_id.to_owned(), bumped);
        Some(PushTicket {
            sessions: self,
            node_id,
            pending: std::sync::atomic::AtomicBool::new(true),
        })
    }
}

/// A push that has not read the database yet. `reading` (or dropping it,
/// should the push fail or be cancelled) lets the next change push again.
pub struct PushTicket<'a> {
    sessions: &'a Sessions,
    node_id: &'a str,
    pending: std::sync::atomic::AtomicBool,
}

impl PushTicket<'_> {
    /// The push is about to take its snapshot: changes from now on need a
    /// push of their own.
    pub fn reading(&self) {
        if self
            .pending
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.sessions
                .pending_pushes
                .lock()
                .unwrap()
                .remove(self.node_id);
        }
    }
}

impl Drop for PushTicket<'_> {
    fn drop(&mut self) {
        self.reading();
    }
}

impl Sessions {
    /// A change for `node_id` committed: true when the caller is to start
    /// the node's pusher, false when one runs and will take it.
    pub fn want_push(&self, node_id: &str) -> bool {
        let mut announced = self.announced.lock().unwrap();
        match announced.get_mut(node_id) {
            Some(waiting) => {
                *waiting = true;
                false
            }
            None => {
                announced.insert(node_id.to_owned(), true);
                true
            }
        }
    }

    /// The pusher's next round: true (and the change taken) when one is
    /// waiting; false, and the pusher ends, when none is.
    pub fn take_push(&self, node_id: &str) -> bool {
        let mut announced = self.announced.lock().unwrap();
        match announced.get_mut(node_id) {
            Some(waiting) if *waiting => {
                *waiting = false;
                true
            }
            _ => {
                announced.remove(node_id);
                false
            }
        }
    }

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

    /// Ends a node's session, telling it `reason` (the node was removed).
    pub fn close(&self, node_id: &str, reason: String) {
        let removed = self.open.lock().unwrap().remove(node_id);
        if let Some((_, tx)) = removed {
            let _ = tx.try_send(Outgoing::Refused(reason));
        }
    }

    pub fn sender(&self, node_id: &str) -> Option<Outbound> {
        self.open
            .lock()
            .unwrap()
            .get(node_id)
            .map(|(_, tx)| tx.clone())
    }

    /// Whether a push to `node_id` is under way that will read a new
    /// generation and has not yet read the database: it carries any change
    /// committed before this call, under a generation the agent has not
    /// seen.
    pub fn push_pending(&self, node_id: &str) -> bool {
        self.pending_pushes
            .lock()
            .unwrap()
            .get(node_id)
            .copied()
            .unwrap_or(false)
    }

    /// A push of `generation` went down `node_id`'s session.
    pub fn record_sent(&self, node_id: &str, generation: u64) {
        let mut sent = self.sent.lock().unwrap();
        let e = sent
            .entry(node_id.to_owned())
            .or_insert((0, std::time::Instant::now()));
        if generation >= e.0 {
            *e = (generation, std::time::Instant::now());
        }
    }

    /// Whether `generation` (or a newer one) went to `node_id` less than
    /// `within` ago: an agent that reports an older one has it on its way.
    pub fn sent_recently(
        &self,
        node_id: &str,
        generation: u64,
        within: std::time::Duration,
    ) -> bool {
        self.sent
            .lock()
            .unwrap()
            .get(node_id)
            .is_some_and(|(g, at)| *g >= generation && at.elapsed() < within)
    }

    pub fn connected(&self) -> usize {
        self.open.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_sent_moments_ago_is_not_resent() {
        let s = Sessions::default();
        let within = std::time::Duration::from_secs(60);
        assert!(!s.sent_recently("a", 3, within));
        s.record_sent("a", 5);
        assert!(s.sent_recently("a", 3, within));
        assert!(s.sent_recently("a", 5, within));
        assert!(
            !s.sent_recently("a", 6, within),
            "a newer generation was not sent"
        );
        assert!(!s.sent_recently("b", 1, within), "nodes are apart");
        // An older generation sent late does not hide the newer one.
        s.record_sent("a", 4);
        assert!(s.sent_recently("a", 5, within));
        assert!(!s.sent_recently("a", 5, std::time::Duration::ZERO));
    }

    #[test]
    fn changes_announced_while_a_pusher_runs_ride_on_its_next_round() {
        let s = Sessions::default();
        assert!(s.want_push("a"), "the first change starts a pusher");
        assert!(!s.want_push("a"), "a change while it runs does not");
        assert!(s.want_push("b"), "nodes are apart");
        // The pusher takes the changes so far in one round…
        assert!(s.take_push("a"));
        // …a change during that round makes one more…
        assert!(!s.want_push("a"));
        assert!(s.take_push("a"));
        // …and with none waiting it ends, so the next change starts anew.
        assert!(!s.take_push("a"));
        assert!(s.want_push("a"));
    }

    #[test]
    fn pushes_coalesce_until_the_pending_one_reads() {
        let s = Sessions::default();
        // A resend (no bump) under way: a change still needs its bump.
        let resend = s.begin_push("a", false).expect("first push goes ahead");
        assert!(!s.push_pending("a"));
        // A bump committed meanwhile: the resend reads it, and carries
        // later changes too.
        assert!(s.begin_push("a", true).is_none());
        assert!(s.push_pending("a"));
        drop(resend);
        let first = s.begin_push("a", true).expect("first push goes ahead");
        // Committed meanwhile: covered by the pending push.
        assert!(s.push_pending("a"));
        assert!(s.begin_push("a", true).is_none());
        // Another node is independent.
        assert!(!s.push_pending("b"));
        assert!(s.begin_push("b", true).is_some());
        first.reading();
        assert!(!s.push_pending("a"));
        // After the snapshot, a change needs its own push.
        let second = s.begin_push("a", true).expect("a new push after the read");
        // A push dropped before reading (failed, cancelled) frees the node.
        drop(second);
        drop(first);
        assert!(s.begin_push("a", true).is_some());
    }
}

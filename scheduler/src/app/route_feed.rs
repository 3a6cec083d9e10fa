//! The route changes this scheduler sends its edges, and which of them each
//! edge has applied. A signup is answered once every connected edge routes
//! the new host, so the customer's first request never meets a 404 from an
//! edge that lags behind.
//!
//! Versions come from one sequence, but transactions commit (and their
//! changes are sent) out of version order: two reports completing at once
//! can send version 104 before 101. "The edge has applied version ≥ 101"
//! then proves nothing about 101. So every change gets a position here as it
//! is sent, in the order every watch receives it; an edge acknowledges the
//! last change it applied in that order, and the acknowledgement covers
//! every change sent before it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use clawdeploy_proto::RouteDelta;
use tokio::sync::{broadcast, Notify};

/// Changes remembered for acknowledgements and waiters; a watch further
/// behind than the channel holds is dropped (and resubscribes) anyway.
const REMEMBERED: usize = 8192;

pub struct RouteFeed {
    out: broadcast::Sender<RouteDelta>,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    next_watch: u64,
    watches: HashMap<u64, Watch>,
    /// The position the next change sent gets.
    next_position: u64,
    /// Recent changes: version → the position it was first sent at.
    first_sent: HashMap<u64, u64>,
    /// The same changes in the order sent: (position, version).
    sent: VecDeque<(u64, u64)>,
}

struct Watch {
    edge_id: String,
    /// Changes sent before this position were committed before the watch's
    /// snapshot was read: the snapshot holds them.
    start: u64,
    /// The snapshot's version, once read.
    snapshot: Option<u64>,
    /// Every change sent before this position is applied on the edge;
    /// `None` until it has applied its snapshot.
    applied_below: Option<u64>,
}

impl Watch {
    /// Whether the edge has applied the change `version`, first sent at
    /// `position`.
    fn has_applied(&self, position: u64, version: u64) -> bool {
        match self.applied_below {
            None => false,
            // In the snapshot: sent before it was read, or the very change
            // whose version the snapshot has (it was committed by then).
            Some(_) if position < self.start || self.snapshot == Some(version) => true,
            Some(below) => position < below,
        }
    }
}

impl Default for RouteFeed {
    fn default() -> Self {
        Self {
            out: broadcast::channel(4096).0,
            state: Mutex::default(),
            changed: Notify::new(),
        }
    }
}

impl RouteFeed {
    /// Sends a committed change to every watch.
    pub fn send(&self, delta: RouteDelta) {
        {
            let mut s = self.state.lock().unwrap();
            let position = s.next_position;
            s.next_position += 1;
            s.first_sent.entry(delta.version).or_insert(position);
            s.sent.push_back((position, delta.version));
            if s.sent.len() > REMEMBERED {
                if let Some((old, version)) = s.sent.pop_front() {
                    if s.first_sent.get(&version) == Some(&old) {
                        s.first_sent.remove(&version);
                    }
                }
            }
            // Under the lock: the channel's order is the positions' order.
            // No receivers is fine: edges get a snapshot when they connect.
            let _ = self.out.send(delta);
        }
        self.changed.notify_waiters();
    }

    /// The changes sent from now on, without counting a watch (tests).
    pub fn subscribe(&self) -> broadcast::Receiver<RouteDelta> {
        self.out.subscribe()
    }

    /// A new watch by `edge_id`: its id and the changes sent from now on.
    /// Read the snapshot after this, then report it with `snapshot_read`.
    pub fn watch(&self, edge_id: &str) -> (u64, broadcast::Receiver<RouteDelta>) {
        let (id, rx, count) = {
            let mut s = self.state.lock().unwrap();
            let rx = self.out.subscribe();
            s.next_watch += 1;
            let id = s.next_watch;
            let start = s.next_position;
            s.watches.insert(
                id,
                Watch {
                    edge_id: edge_id.to_owned(),
                    start,
                    snapshot: None,
                    applied_below: None,
                },
            );
            (id, rx, s.watches.len())
        };
        metrics::gauge!("clawdeploy_edges_connected").set(count as f64);
        (id, rx)
    }

    /// The version of the snapshot the watch sends first.
    pub fn snapshot_read(&self, watch_id: u64, version: u64) {
        if let Some(w) = self.state.lock().unwrap().watches.get_mut(&watch_id) {
            w.snapshot = Some(version);
        }
    }

    pub fn unwatch(&self, watch_id: u64) {
        let left = {
            let mut s = self.state.lock().unwrap();
            s.watches.remove(&watch_id);
            s.watches.len()
        };
        metrics::gauge!("clawdeploy_edges_connected").set(left as f64);
        self.changed.notify_waiters();
    }

    /// `edge_id` applied `version`, the last change (or snapshot) it got.
    /// An acknowledgement that matches nothing sent to its watch since the
    /// last one (a late one from an earlier watch) changes nothing.
    pub fn ack(&self, edge_id: &str, version: u64) {
        {
            let mut guard = self.state.lock().unwrap();
            let State { watches, sent, .. } = &mut *guard;
            for w in watches.values_mut().filter(|w| w.edge_id == edge_id) {
                let after = match w.applied_below {
                    // The first event of a watch is its snapshot; a later
                    // change with the same version is read as the snapshot,
                    // which claims less.
                    None if w.snapshot == Some(version) => {
                        w.applied_below = Some(w.start);
                        continue;
                    }
                    None => w.start,
                    Some(below) => below,
                };
                let from = sent.partition_point(|&(p, _)| p < after);
                if let Some(&(p, _)) = sent.range(from..).find(|&&(_, v)| v == version) {
                    w.applied_below = Some(p + 1);
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// Whether every connected edge has applied the change `version`.
    fn applied_everywhere(&self, version: u64) -> bool {
        let s = self.state.lock().unwrap();
        if s.watches.is_empty() {
            return true;
        }
        // Not sent yet (another scheduler's change on its way here).
        let Some(&position) = s.first_sent.get(&version) else {
            return false;
        };
        s.watches.values().all(|w| w.has_applied(position, version))
    }

    /// Waits until every connected edge has applied the change `version`
    /// (sent by this scheduler, or still to be), at most `within`. Returns
    /// whether they all did.
    pub async fn wait_all(&self, version: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.applied_everywhere(version) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.applied_everywhere(version);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn delta(version: u64) -> RouteDelta {
        RouteDelta {
            version,
            ..Default::default()
        }
    }

    /// A watch that has read its snapshot at `version` and applied it.
    fn watching(feed: &RouteFeed, edge: &str, version: u64) -> u64 {
        let (id, _rx) = feed.watch(edge);
        feed.snapshot_read(id, version);
        feed.ack(edge, version);
        id
    }

    const SOON: Duration = Duration::from_millis(10);

    #[tokio::test]
    async fn waits_for_every_connected_edge() {
        let feed = Arc::new(RouteFeed::default());
        assert!(
            feed.wait_all(7, SOON).await,
            "no edges: nothing to wait for"
        );
        let a = watching(&feed, "a", 6);
        watching(&feed, "b", 6);
        feed.send(delta(7));
        feed.ack("a", 7);
        assert!(!feed.wait_all(7, SOON).await, "b has not acked");
        let waiter = {
            let feed = feed.clone();
            tokio::spawn(async move { feed.wait_all(7, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(SOON).await;
        feed.send(delta(9));
        feed.ack("b", 9);
        assert!(waiter.await.unwrap(), "9 was sent after 7: b has 7 too");
        // A disconnected edge no longer holds anyone back.
        feed.unwatch(a);
        assert!(feed.wait_all(9, SOON).await);
    }

    #[tokio::test]
    async fn a_higher_version_sent_first_does_not_cover_a_lower_one() {
        let feed = RouteFeed::default();
        watching(&feed, "e", 100);
        // Two transactions took 101 and 104; 104 committed and went first.
        feed.send(delta(104));
        feed.ack("e", 104);
        assert!(feed.wait_all(104, SOON).await);
        assert!(
            !feed.wait_all(101, SOON).await,
            "101 is not even sent: the edge cannot have it"
        );
        feed.send(delta(101));
        assert!(!feed.wait_all(101, SOON).await, "sent, not yet applied");
        feed.ack("e", 101);
        assert!(feed.wait_all(101, SOON).await);
        assert!(feed.wait_all(104, SOON).await, "still applied");
    }

    #[tokio::test]
    async fn an_acknowledgement_covers_what_was_sent_before_it() {
        let feed = RouteFeed::default();
        watching(&feed, "e", 1);
        for v in [5, 3, 4] {
            feed.send(delta(v));
        }
        // The edge coalesces: it names only the last it applied.
        feed.ack("e", 3);
        assert!(feed.wait_all(5, SOON).await && feed.wait_all(3, SOON).await);
        assert!(!feed.wait_all(4, SOON).await);
        // An acknowledgement of nothing sent since (late, or made up)
        // changes nothing.
        feed.ack("e", 5);
        feed.ack("e", 99);
        assert!(!feed.wait_all(4, SOON).await);
        feed.ack("e", 4);
        assert!(feed.wait_all(4, SOON).await);
    }

    /// After a gap in the other schedulers' events the recent versions are
    /// sent again (`background/peer_events.rs`), mid-burst: a waiter must
    /// still wait for the first copy, and an acknowledgement of a re-sent
    /// copy covers everything sent before it.
    #[tokio::test]
    async fn changes_sent_again_after_a_gap_are_still_waited_for_in_order() {
        let feed = RouteFeed::default();
        watching(&feed, "e", 10);
        for v in [12, 11] {
            feed.send(delta(v));
        }
        feed.ack("e", 12);
        assert!(!feed.wait_all(11, SOON).await, "11 came after 12");
        // The catch-up: 11 and 12 again, and a change of this burst (13)
        // among them; the edge ignores what it has and acknowledges each.
        for v in [11, 13, 12] {
            feed.send(delta(v));
        }
        assert!(!feed.wait_all(11, SOON).await, "no copy of 11 applied yet");
        assert!(!feed.wait_all(13, SOON).await);
        // The first re-sent 11 acknowledged: the original 11 (sent before
        // it) is applied, 13 (sent after it) is not.
        feed.ack("e", 11);
        assert!(feed.wait_all(11, SOON).await);
        assert!(!feed.wait_all(13, SOON).await);
        // 12's last copy covers 13.
        feed.ack("e", 12);
        assert!(feed.wait_all(13, SOON).await);
        assert!(feed.wait_all(12, SOON).await && feed.wait_all(11, SOON).await);
    }

    /// More changes than the feed remembers: the oldest are forgotten, so a
    /// waiter for one of them waits (it cannot be shown applied) rather
    /// than being told yes; a new change is still tracked.
    #[tokio::test]
    async fn a_change_older_than_the_feed_remembers_is_not_claimed_applied() {
        let feed = RouteFeed::default();
        watching(&feed, "e", 0);
        let last = REMEMBERED as u64 + 10;
        for v in 1..=last {
            feed.send(delta(v));
        }
        feed.ack("e", last);
        assert!(feed.wait_all(last, SOON).await);
        assert!(feed.wait_all(last - REMEMBERED as u64 + 1, SOON).await);
        assert!(!feed.wait_all(1, SOON).await, "1 is forgotten");
    }

    #[tokio::test]
    async fn a_new_watch_has_what_was_sent_before_it_in_its_snapshot() {
        let feed = RouteFeed::default();
        watching(&feed, "old", 0);
        feed.send(delta(8));
        feed.ack("old", 8);
        let (id, _rx) = feed.watch("new");
        // 10 committed before the snapshot was read, and is sent after
        // the watch began: the snapshot has it, and so will the stream.
        feed.send(delta(10));
        feed.ack("old", 10);
        feed.snapshot_read(id, 10);
        assert!(
            !feed.wait_all(8, SOON).await,
            "the new edge has not applied its snapshot yet"
        );
        // Its first acknowledgement is the snapshot's.
        feed.ack("new", 10);
        assert!(feed.wait_all(8, SOON).await, "8 was sent before the watch");
        assert!(feed.wait_all(10, SOON).await, "10 is the snapshot's own");
        // A change sent after the watch began, below the snapshot's
        // version, may have committed after it was read.
        feed.send(delta(9));
        feed.ack("old", 9);
        assert!(!feed.wait_all(9, SOON).await);
        feed.ack("new", 9);
        assert!(feed.wait_all(9, SOON).await);
    }
}

//! Where the next pool container goes, and how the warm pool is spread:
//! pure decisions over the nodes' loads as their heartbeats reported them.

/// One schedulable node as the pool manager sees it during one pass.
#[derive(Clone, Debug, Default)]
pub struct NodeLoad {
    pub id: String,
    /// Containers the node accepts at most.
    pub max: i64,
    /// Warm pool containers of the current generation (creating, warming, idle).
    pub pool: i64,
    /// Every container that holds resources there.
    pub total: i64,
    /// From the last heartbeat; 0 means not reported (yet).
    pub memory_available: i64,
    pub memory_total: i64,
    pub cpu_busy_permille: i64,
}

/// A node this busy takes no new pool containers while others have room.
const CPU_BUSY_LIMIT_PERMILLE: i64 = 950;

impl NodeLoad {
    /// Whether one more container of `memory` bytes fits: a free slot, and
    /// the memory the heartbeat reported free covers its limit.
    pub fn fits(&self, memory: i64) -> bool {
        self.total < self.max && (self.memory_available == 0 || self.memory_available >= memory)
    }

    /// The scarcest of free slots, free memory and idle CPU, in permille.
    pub fn headroom_permille(&self) -> i64 {
        let slots = (self.max - self.total).max(0) * 1000 / self.max.max(1);
        let memory = if self.memory_total > 0 && self.memory_available > 0 {
            (self.memory_available * 1000 / self.memory_total).min(1000)
        } else {
            1000
        };
        let cpu = 1000 - self.cpu_busy_permille.clamp(0, 1000);
        slots.min(memory).min(cpu)
    }

    /// Books one more container of `memory` bytes on this node for the rest
    /// of the pass (the next heartbeat brings the real figures).
    pub fn place(&mut self, memory: i64) {
        self.pool += 1;
        self.total += 1;
        if self.memory_available > 0 {
            self.memory_available = (self.memory_available - memory).max(1);
        }
    }
}

/// The node for one more pool container: among nodes where it fits, the one
/// with the fewest pool containers (spread), then the most headroom; a node
/// at its CPU limit only when no other fits.
pub fn pick(nodes: &mut [NodeLoad], memory: i64) -> Option<&mut NodeLoad> {
    nodes.iter_mut().filter(|n| n.fits(memory)).min_by_key(|n| {
        (
            n.cpu_busy_permille >= CPU_BUSY_LIMIT_PERMILLE,
            n.pool,
            std::cmp::Reverse(n.headroom_permille()),
        )
    })
}

/// What one rebalancing step should do, if anything.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Create one more container on this node (a brief overshoot by one).
    Grow(usize),
    /// Retire one idle container from this node.
    Retire(usize),
}

/// Shrinks and spreads the warm pool, one step per pass so the idle count
/// never dips below the target:
/// - a pool above its target (demand faded, or `max_idle` was lowered) with
///   idle to spare retires one container from the fullest node;
/// - when one node holds at least two more pool containers than another,
///   one more is added on the emptier node; the next passes then retire one
///   from the fuller node.
pub fn rebalance_step(
    nodes: &[NodeLoad],
    warm: i64,
    idle: i64,
    target: i64,
    max_idle: i64,
    memory: i64,
) -> Option<Step> {
    let fullest = (0..nodes.len()).max_by_key(|&i| (nodes[i].pool, std::cmp::Reverse(i)))?;
    if warm > target && idle > target {
        return Some(Step::Retire(fullest));
    }
    let emptiest = (0..nodes.len())
        .filter(|&i| nodes[i].fits(memory))
        .min_by_key(|&i| (nodes[i].pool, nodes[i].total))?;
    if nodes[fullest].pool - nodes[emptiest].pool >= 2 && warm <= target && warm < max_idle {
        Some(Step::Grow(emptiest))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: i64 = 1024 * 1024;

    fn node(id: &str, max: i64, pool: i64) -> NodeLoad {
        NodeLoad {
            id: id.into(),
            max,
            pool,
            total: pool,
            ..Default::default()
        }
    }

    #[test]
    fn pick_spreads_and_respects_capacity() {
        let mut nodes = vec![node("a", 3, 0), node("b", 3, 0)];
        let mut placed = Vec::new();
        while let Some(n) = pick(&mut nodes, 512 * MB) {
            n.place(512 * MB);
            placed.push(n.id.clone());
        }
        assert_eq!(placed, ["a", "b", "a", "b", "a", "b"]);
    }

    #[test]
    fn pick_follows_reported_free_capacity() {
        let mut nodes = vec![
            // Plenty of slots but almost no free memory: never used.
            NodeLoad {
                memory_available: 300 * MB,
                memory_total: 8192 * MB,
                ..node("tight", 20, 0)
            },
            // Busy CPU: only when nothing else fits.
            NodeLoad {
                cpu_busy_permille: 990,
                ..node("busy", 20, 0)
            },
            NodeLoad {
                memory_available: 2048 * MB,
                memory_total: 8192 * MB,
                ..node("small", 20, 0)
            },
            NodeLoad {
                memory_available: 6144 * MB,
                memory_total: 8192 * MB,
                ..node("roomy", 20, 0)
            },
        ];
        let mut placed = Vec::new();
        for _ in 0..6 {
            let n = pick(&mut nodes, 512 * MB).expect("room");
            n.place(512 * MB);
            placed.push(n.id.clone());
        }
        // Spread first (pool counts), the roomier node first on ties.
        assert_eq!(
            placed,
            ["roomy", "small", "roomy", "small", "roomy", "small"]
        );
        for _ in 0..5 {
            let n = pick(&mut nodes, 512 * MB).expect("room");
            n.place(512 * MB);
            placed.push(n.id.clone());
        }
        // The small node's 2 GB hold four 512 MB containers, then no more.
        assert_eq!(&placed[6..], ["roomy", "small", "roomy", "roomy", "roomy"]);
        assert!(!placed.contains(&"tight".to_string()));
        // Only when the others are full does the busy node take one.
        nodes[2].max = nodes[2].total;
        nodes[3].max = nodes[3].total;
        assert_eq!(
            pick(&mut nodes, 512 * MB).map(|n| n.id.clone()).as_deref(),
            Some("busy")
        );
    }

    #[test]
    fn rebalancing_converges_without_dropping_idle_below_target() {
        // Node a filled the pool alone before b connected.
        let mut nodes = vec![node("a", 20, 5), node("b", 20, 0)];
        let mut steps = 0;
        loop {
            let warm: i64 = nodes.iter().map(|n| n.pool).sum();
            let Some(step) = rebalance_step(&nodes, warm, warm, 5, 20, MB) else {
                break;
            };
            match step {
                Step::Grow(i) => nodes[i].pool += 1,
                Step::Retire(i) => nodes[i].pool -= 1,
            }
            let total: i64 = nodes.iter().map(|n| n.pool).sum();
            assert!(total >= 5, "idle dipped below target");
            steps += 1;
            assert!(steps < 20);
        }
        assert_eq!((nodes[0].pool, nodes[1].pool), (3, 2));
    }

    #[test]
    fn a_pool_above_its_target_shrinks_one_step_at_a_time() {
        // A burst lifted the target to 9; demand faded back to 5.
        let mut nodes = vec![node("a", 20, 5), node("b", 20, 4)];
        let mut idle = 9;
        while let Some(step) = rebalance_step(&nodes, idle, idle, 5, 20, MB) {
            let Step::Retire(i) = step else {
                panic!("grew while above target")
            };
            nodes[i].pool -= 1;
            idle -= 1;
        }
        assert_eq!(idle, 5);
        assert!((nodes[0].pool - nodes[1].pool).abs() <= 1, "{nodes:?}");
        // Still warming: nothing is retired until the idle count allows it.
        assert_eq!(rebalance_step(&nodes, 7, 5, 5, 20, MB), None);
    }
}

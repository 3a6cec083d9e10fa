//! The fleet: where containers go (capacity and placement), how many warm
//! ones the pool should hold (demand and the pool's settings), and the
//! operator's changes to nodes.

pub mod capacity;
pub mod demand;
pub mod nodes;
pub mod placement;
pub mod settings;

//! The scheduler's side of the node agents: a node's desired state (built
//! and pushed) and its enrollment (join tokens, certificates). The session
//! an agent holds is `rpc::session`.

pub mod desired;
pub mod enroll;

//! ClawDeploy's metering proxy: tenants' gateways call models through it
//! with a per-instance token; it swaps in the provider key (the customer's
//! own, or the platform's for AI credits), holds the worst case against
//! the account's credits, passes the answer through byte for byte and
//! settles to the usage the upstream reports, recording usage in batches.

pub mod error;
pub mod forward;
pub mod ledger;
pub mod limits;
pub mod money;
pub mod prices;
pub mod pricing;
pub mod server;
pub mod sse;
pub mod state;
pub mod telemetry;
pub mod tenant;
pub mod usage;

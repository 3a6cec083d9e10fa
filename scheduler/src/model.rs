//! The states the database keeps, as types: each enum has exactly the
//! values of its column's `CHECK` constraint, so a misspelt state cannot
//! compile. Generations and route versions are newtypes over the `bigint`
//! columns, converted once to the protocol's `u64`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `nodes.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Takes new containers.
    Active,
    /// Keeps its tenants; nothing new is placed there.
    Draining,
    /// Missed heartbeats for the TTL; back to active on its next one.
    Unreachable,
    /// For good: its certificate is refused.
    Removed,
}

impl NodeState {
    pub const ALL: [NodeState; 4] = [
        NodeState::Active,
        NodeState::Draining,
        NodeState::Unreachable,
        NodeState::Removed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Unreachable => "unreachable",
            NodeState::Removed => "removed",
        }
    }
}

/// `containers.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    Creating,
    Warming,
    /// Warm, in the pool.
    Idle,
    /// Claimed; the agent has not yet confirmed the tenant's config live.
    Assigning,
    Assigned,
    /// A migration's target: filled from an archive, not yet serving.
    Migrating,
    Failed,
    /// Stopped with its volume kept (a released instance's grace period).
    Suspended,
    Destroying,
    Destroyed,
}

/// `instances.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Every node was full: waiting in line, no container yet.
    Queued,
    Pending,
    Ready,
    Failed,
    Suspended,
    /// Released: the data is kept for the grace period.
    Deleting,
    Deleted,
}

/// `migrations.state`: a migration's step. The first two are live (one per
/// instance at most); the last two are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// The source container is stopped and its state uploaded.
    Exporting,
    /// The target container is created from the archive and started.
    Importing,
    /// The route points at the target; the source is destroyed.
    Done,
    /// Something failed before the switch: the source runs again.
    RolledBack,
}

/// `migrations.kind`: why a migration was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum MigrationKind {
    /// An operator moved one instance.
    Migrate,
    /// Its node was evacuated.
    Evacuate,
    /// A backup was restored into a new container.
    Restore,
}

/// `instances.tier`: what the customer pays for (the product spec's plans;
/// their resources are `billing::plans`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Free,
    Pro,
    Team,
}

impl Tier {
    /// The name the database and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Team => "team",
        }
    }
}

/// `billing_accounts.status`: where an account stands with Stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum BillingStatus {
    /// Never subscribed.
    None,
    Active,
    /// A payment failed; Stripe retries it and the tier stays.
    PastDue,
    /// Stripe's retries are over: the tier lasts until the grace deadline.
    Grace,
    Canceled,
}

/// `domains.state`: a customer's own hostname on its way to being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// Waiting for the TXT (and CNAME) records.
    PendingDns,
    Verified,
    Issuing,
    Active,
    Renewing,
    /// See the reason.
    Failed,
    /// Switched off (a downgrade, records gone); the reason says which.
    Off,
}

impl DomainState {
    pub const ALL: [DomainState; 7] = [
        DomainState::PendingDns,
        DomainState::Verified,
        DomainState::Issuing,
        DomainState::Active,
        DomainState::Renewing,
        DomainState::Failed,
        DomainState::Off,
    ];

    /// As the database and the API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::PendingDns => "pending_dns",
            DomainState::Verified => "verified",
            DomainState::Issuing => "issuing",
            DomainState::Active => "active",
            DomainState::Renewing => "renewing",
            DomainState::Failed => "failed",
            DomainState::Off => "off",
        }
    }
}

/// `backups.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum BackupState {
    /// The container is stopped and its state uploading.
    Taking,
    /// In the archive store, restorable.
    Stored,
    Failed,
    /// Past the retention period: the archive is deleted.
    Expired,
}

/// `backups.kind`: why a backup was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    /// The daily schedule.
    Scheduled,
    /// An operator asked.
    Manual,
    /// The export before a released instance is destroyed.
    Release,
}

/// A node's desired-state generation (`nodes.generation`): the agent keeps
/// the highest it has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, sqlx::Type)]
#[sqlx(transparent)]
pub struct Generation(i64);

/// A route change's place in the one route order (`routes.version`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, sqlx::Type)]
#[sqlx(transparent)]
pub struct RouteVersion(i64);

macro_rules! wire_u64 {
    ($t:ident) => {
        impl $t {
            /// As the protocol carries it.
            pub fn wire(self) -> u64 {
                // The columns are never negative.
                u64::try_from(self.0).unwrap_or(0)
            }

            /// From the protocol; values past `i64::MAX` saturate.
            pub fn from_wire(v: u64) -> Self {
                $t(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
    };
}
wire_u64!(Generation);
wire_u64!(RouteVersion);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_convert_without_wrapping() {
        assert_eq!(Generation::from_wire(7).wire(), 7);
        assert_eq!(Generation::from_wire(u64::MAX).wire(), i64::MAX as u64);
        assert_eq!(RouteVersion(-1).wire(), 0);
        assert!(Generation::from_wire(3) < Generation::from_wire(4));
    }

    #[test]
    fn states_serialize_as_the_database_spells_them() {
        for s in NodeState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in DomainState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(
            serde_json::to_value(ContainerState::Assigning).unwrap(),
            "assigning"
        );
        assert_eq!(
            serde_json::to_value(InstanceStatus::Deleting).unwrap(),
            "deleting"
        );
    }
}

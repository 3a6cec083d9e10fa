//! What the API answers, as types: each view both serializes the answer and
//! describes it in the OpenAPI document, so the two cannot drift apart.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::app::Config;
use crate::backup::Backup;
use crate::fleet::settings::PoolSettings;
use crate::migration::{Migration, Step};
mod account;
pub use account::*;

use crate::model::{
    BackupKind, BackupState, BillingStatus, DomainState, InstanceStatus, MigrationKind,
    MigrationState, NodeState, Tier,
};

/// Every error: a stable code and a message for people.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable (`invalid_field`, `subdomain_taken`, …).
    pub code: String,
    pub message: String,
}

#[derive(Serialize, ToSchema)]
pub struct InstanceEnvelope {
    pub instance: InstanceView,
}

/// An instance as its owner sees it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    pub id: Uuid,
    pub subdomain: String,
    pub url: String,
    pub gateway_url: String,
    /// Shown once the instance is live.
    pub gateway_token: Option<String>,
    pub status: InstanceStatus,
    pub tier: Tier,
    pub status_url: String,
    /// Provider → masked key (`sk-…1234`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<BTreeMap<String, String>>,
    /// After a change: the config version, and whether the gateway runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_applied: Option<bool>,
    /// Model usage this month and the account's AI credits
    /// (`GET /api/instances/me`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageView>,
}

/// Model usage this month (UTC) and AI credits, in micro-dollars.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageView {
    pub messages_this_month: i64,
    pub tokens_this_month: i64,
    /// What AI credits paid this month.
    pub cost_this_month_micros: i64,
    /// The month's message limit (free tier); `null`: none.
    pub message_limit: Option<u32>,
    pub credit_balance_micros: i64,
}

impl UsageView {
    pub fn new(u: crate::billing::credits::Usage, message_limit: Option<u32>) -> Self {
        UsageView {
            messages_this_month: u.messages_this_month,
            tokens_this_month: u.tokens_this_month,
            cost_this_month_micros: u.charged_this_month_micros,
            message_limit,
            credit_balance_micros: u.credit_balance_micros,
        }
    }
}

/// `POST /api/credits/top-up`: how the off-session charge went. The
/// balance changes only when Stripe's `payment_intent.succeeded` arrives.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopUpView {
    /// The bank asks the customer to authenticate (3-D Secure): confirm
    /// the PaymentIntent with `clientSecret` (Stripe.js), then the webhook
    /// adds the credits.
    pub requires_action: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    pub payment_intent: String,
}

/// `GET /api/credits`: the account's AI credits.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreditsView {
    pub balance_micros: i64,
    /// Of the balance, what metering proxies hold for requests.
    pub held_micros: i64,
    /// What AI credits paid this month, over every instance.
    pub spent_this_month_micros: i64,
}

impl InstanceView {
    /// The view of an instance. The gateway token is shown once the
    /// instance is live: until then a retried claim may still move it to
    /// another container with another token.
    pub fn new(cfg: &Config, i: crate::lifecycle::instances::Instance) -> Self {
        let token = i
            .gateway_token
            .filter(|_| matches!(i.status, InstanceStatus::Ready | InstanceStatus::Suspended));
        InstanceView {
            url: cfg.url_of(&i.subdomain),
            gateway_url: cfg.gateway_url_of(&i.subdomain),
            status_url: status_url(i.id),
            id: i.id,
            subdomain: i.subdomain,
            gateway_token: token,
            status: i.status,
            tier: i.tier,
            api_keys: i.masked_keys,
            config_version: None,
            config_applied: None,
            usage: None,
        }
    }
}

/// Where a signup's progress can be read.
pub fn status_url(id: Uuid) -> String {
    format!("/api/instances/{id}")
}

#[derive(Serialize, ToSchema)]
pub struct ReleasedView {
    pub id: Uuid,
    pub subdomain: String,
    /// `deleting`: the data is kept for the grace period.
    pub status: InstanceStatus,
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub ok: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Availability {
    pub subdomain: String,
    pub host: String,
    pub available: bool,
}

/// What an operator hands to a new node: the token and the CA pin.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JoinTokenView {
    /// One-time: `<id>.<secret>`.
    pub token: String,
    /// SHA-256 of the CA certificate, for the node to pin.
    pub ca_pin: String,
    pub node_id: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// A node as the operator sees it: the product spec's fields (`ip`,
/// `status`, `containers`) next to the richer ones.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub id: String,
    /// Its public address, or the private one it registered when no public
    /// address is known.
    pub ip: String,
    /// The spec's word for the state: `healthy` (active), `draining`,
    /// `unreachable` or `removed`.
    pub status: NodeStatus,
    pub state: NodeState,
    /// Its desired state's generation.
    pub generation: i64,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub cert_not_after: Option<DateTime<Utc>>,
    pub containers: ContainerCounts,
    pub idle: i64,
    pub assigned: i64,
    /// The node holds its session with this scheduler.
    pub connected: bool,
    /// Some scheduler heard the node within the heartbeat TTL (with two
    /// schedulers, the node may hold its session with the other one).
    pub heartbeat_fresh: bool,
    pub usage: NodeUsage,
    /// Free container slots (the most it accepts minus what it holds).
    pub free_slots: i64,
    /// Present while the node is being evacuated.
    pub evacuation: Option<EvacuationView>,
}

/// An evacuation's progress: tenants still on the node, and how many of
/// them are migrating now.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvacuationView {
    pub remaining: i64,
    pub migrating: i64,
}

/// The spec's node status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Healthy,
    Draining,
    Unreachable,
    Removed,
}

impl From<NodeState> for NodeStatus {
    fn from(s: NodeState) -> Self {
        match s {
            NodeState::Active => NodeStatus::Healthy,
            NodeState::Draining => NodeStatus::Draining,
            NodeState::Unreachable => NodeStatus::Unreachable,
            NodeState::Removed => NodeStatus::Removed,
        }
    }
}

/// A node's containers: every one that is not destroyed or failed, and of
/// those the idle (warm, in the pool) and the assigned (a tenant's).
#[derive(Serialize, ToSchema)]
pub struct ContainerCounts {
    pub total: i64,
    pub idle: i64,
    pub assigned: i64,
}

/// What the node's last heartbeat reported.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeUsage {
    /// 0 to 1.
    pub cpu_busy: f64,
    pub memory_available_bytes: i64,
    pub disk_available_bytes: i64,
    pub disk_total_bytes: i64,
    pub containers_running: i32,
}

/// A node after an operator changed its state.
#[derive(Serialize, ToSchema)]
pub struct NodeStateView {
    pub id: String,
    pub state: NodeState,
}

#[derive(Serialize, ToSchema)]
pub struct PoolView {
    pub settings: PoolSettings,
    /// Warm containers by state, image and generation.
    pub containers: Vec<crate::fleet::settings::WarmCount>,
}

#[derive(Serialize, ToSchema)]
pub struct PoolSettingsView {
    pub settings: PoolSettings,
}

/// A JSON object (this document itself).
#[derive(Serialize, ToSchema)]
#[schema(value_type = Object)]
pub struct AnyObject(serde_json::Value);

/// A migration as the operator follows it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationView {
    pub id: Uuid,
    pub instance_id: Uuid,
    pub kind: MigrationKind,
    /// `exporting`, `importing`, then `done` or `rolled_back`.
    pub state: MigrationState,
    pub source_node: String,
    pub target_node: String,
    /// The archive's size once the source exported it.
    pub archive_bytes: Option<i64>,
    /// Why it rolled back; empty otherwise.
    pub error: String,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Each step with when it began.
    pub steps: Vec<Step>,
}

impl From<Migration> for MigrationView {
    fn from(m: Migration) -> Self {
        MigrationView {
            id: m.id,
            instance_id: m.instance_id,
            kind: m.kind,
            state: m.state,
            source_node: m.source_node,
            target_node: m.target_node,
            archive_bytes: m.archive_bytes,
            error: m.error,
            requested_by: m.requested_by,
            created_at: m.created_at,
            finished_at: m.finished_at,
            steps: m.steps.0,
        }
    }
}

/// A backup of an instance's state.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupView {
    pub id: Uuid,
    /// `scheduled` (daily), `manual` (an operator) or `release` (before a
    /// released instance's data is destroyed).
    pub kind: BackupKind,
    /// `taking`, `stored` (restorable) or `failed`.
    pub state: BackupState,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The archive's size once stored.
    pub bytes: Option<i64>,
    /// Why it failed; empty otherwise.
    pub error: String,
}

impl From<Backup> for BackupView {
    fn from(b: Backup) -> Self {
        BackupView {
            id: b.id,
            kind: b.kind,
            state: b.state,
            created_at: b.created_at,
            finished_at: b.finished_at,
            bytes: b.archive_bytes,
            error: b.error,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct BackupList {
    pub backups: Vec<BackupView>,
}

/// One plan, for the page and for clients.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanView {
    pub tier: Tier,
    /// The Stripe price to subscribe to; none for the free tier or while
    /// billing is not configured.
    pub price_id: Option<String>,
    pub monthly_price_cents: u32,
    pub cpu_millis: u32,
    pub memory_mb: u32,
    pub storage_gb: u32,
    pub custom_domains: bool,
    /// Model requests a second per instance, and the burst above it.
    pub model_requests_per_second: u32,
    pub model_burst: u32,
    /// Model messages a month; `null`: no limit.
    pub model_messages_per_month: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct PlanList {
    pub plans: Vec<PlanView>,
}

/// An instance's tier after a change, and before it.
#[derive(Serialize, ToSchema)]
pub struct TierChangeView {
    pub id: Uuid,
    pub tier: Tier,
    pub previous: Tier,
}

/// An account's billing state.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BillingView {
    pub tier: Tier,
    /// `none` (never subscribed), `active`, `past_due` (Stripe retries a
    /// failed payment; the tier stays), `grace` (retries over; the tier
    /// lasts until `graceUntil`), `canceled`.
    pub status: BillingStatus,
    pub current_period_end: Option<DateTime<Utc>>,
    pub grace_until: Option<DateTime<Utc>>,
}

/// What the webhook answers Stripe.
#[derive(Serialize, ToSchema)]
pub struct WebhookAck {
    pub received: bool,
    /// applied, linked, duplicate, stale, unknown_account, ignored or
    /// unreadable (signed, kept for an operator).
    pub outcome: &'static str,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutView {
    pub checkout_url: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortalView {
    pub portal_url: String,
}

/// A DNS record the customer creates.
#[derive(Serialize, ToSchema)]
pub struct RecordView {
    /// `TXT`, `CNAME`, `A` or `AAAA`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub name: String,
    pub value: String,
}

/// A custom domain as its owner sees it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainView {
    pub hostname: String,
    pub state: DomainState,
    /// Why it failed or was switched off; empty otherwise.
    pub reason: String,
    pub certificate_not_after: Option<DateTime<Utc>>,
    pub records: Vec<RecordView>,
}

#[derive(Serialize, ToSchema)]
pub struct DomainEnvelope {
    pub domain: DomainView,
}

#[derive(Serialize, ToSchema)]
pub struct DomainList {
    pub domains: Vec<DomainView>,
}

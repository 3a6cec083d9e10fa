//! What applying one Stripe delivery did: the webhook's answer and the
//! label of its metric (`billing/webhook.rs`, `billing/credits_events.rs`).

/// What a delivery did, for the answer and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Customer and subscription linked to an account (checkout).
    Linked,
    /// The account's billing state (and perhaps tier) changed.
    Applied,
    /// Older than the state already applied: acknowledged, not applied.
    Stale,
    /// Already applied once (a redelivery).
    Duplicate,
    /// No account knows this customer or subscription.
    UnknownAccount,
    /// A type billing does not act on.
    Ignored,
    /// Signed, but not readable as billing's API version: kept for an
    /// operator (`stripe_unreadable_events`).
    Unreadable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Linked => "linked",
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::Duplicate => "duplicate",
            Outcome::UnknownAccount => "unknown_account",
            Outcome::Ignored => "ignored",
            Outcome::Unreadable => "unreadable",
        }
    }
}

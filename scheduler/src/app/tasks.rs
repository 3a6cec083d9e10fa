//! The handles that activate background tasks between their periodic
//! runs: a claim wakes the pool manager, an agent's export report the
//! migration driver, a queued signup the signup queue, a proven domain the
//! certificate worker, new mail the sender. The tasks themselves and the one driver that runs
//! them are in `background/`; this is all the rest of the scheduler sees
//! of them.

use tokio::sync::Notify;

/// Activates one background task: its next run starts now rather than at
/// its next period (activations while it runs coalesce into one more run).
#[derive(Default)]
pub struct Activator(Notify);

impl Activator {
    pub fn activate(&self) {
        self.0.notify_one();
    }

    /// Resolves at the next activation (or at once, for one that came
    /// while nobody waited).
    pub async fn activated(&self) {
        self.0.notified().await;
    }
}

/// The background tasks other code activates.
#[derive(Default)]
pub struct Activators {
    /// Claims, containers becoming idle, nodes joining or changing state,
    /// pool settings.
    pub pool_manager: Activator,
    /// An export reported, a target up or failed, a migration started.
    pub migrations: Activator,
    /// A signup queued, a node said hello.
    pub signup_queue: Activator,
    /// A domain was just proven: order its certificate now.
    pub domains: Activator,
    /// Mail was written to the outbox.
    pub mail: Activator,
    /// An account's deletion was asked for or undone, or its email moved:
    /// tell Stripe.
    pub billing_sync: Activator,
}

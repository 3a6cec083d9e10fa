//! How many containers Docker creates at once, with a lane kept for
//! tenants.

/// Bounds the containers Docker creates at once. A container a customer
/// waits on (claimed on demand, the pool being empty) may also take the
/// one slot reserved for tenants, so it does not queue behind the pool's
/// refills, while the total stays bounded (unbounded parallel creates made
/// each one slower on a small host).
pub struct CreateSlots {
    shared: tokio::sync::Semaphore,
    tenant_lane: tokio::sync::Semaphore,
}

impl CreateSlots {
    pub(super) fn new(max_parallel: usize) -> Self {
        Self {
            shared: tokio::sync::Semaphore::new(max_parallel.max(1)),
            tenant_lane: tokio::sync::Semaphore::new(1),
        }
    }

    pub(super) async fn acquire(
        &self,
        for_tenant: bool,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if for_tenant {
            tokio::select! {
                p = self.shared.acquire() => p.ok(),
                p = self.tenant_lane.acquire() => p.ok(),
            }
        } else {
            self.shared.acquire().await.ok()
        }
    }
}

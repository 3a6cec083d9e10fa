//! Signups claiming on this scheduler right now. While any is in flight the
//! pool manager holds its refills back: a burst's claims come first, and
//! the pool catches up once they have answered.

use tokio::sync::watch;

pub struct ClaimsInFlight {
    count: watch::Sender<usize>,
}

impl Default for ClaimsInFlight {
    fn default() -> Self {
        Self {
            count: watch::Sender::new(0),
        }
    }
}

/// One signup in flight; dropping it (however the signup ends) lets it go.
pub struct InFlight<'a>(&'a ClaimsInFlight);

impl ClaimsInFlight {
    /// Counts a signup in until the guard drops.
    pub fn enter(&self) -> InFlight<'_> {
        self.count.send_modify(|n| *n += 1);
        InFlight(self)
    }

    pub fn busy(&self) -> bool {
        *self.count.borrow() > 0
    }

    /// Resolves once no signup is in flight.
    pub async fn quiet(&self) {
        let mut rx = self.count.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.count.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn quiet_waits_for_the_last_signup() {
        let claims = ClaimsInFlight::default();
        claims.quiet().await;
        let a = claims.enter();
        let b = claims.enter();
        assert!(claims.busy());
        drop(a);
        assert!(claims.busy());
        let quiet = claims.quiet();
        tokio::pin!(quiet);
        assert!(futures::poll!(quiet.as_mut()).is_pending());
        drop(b);
        quiet.await;
        assert!(!claims.busy());
    }
}

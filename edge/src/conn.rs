//! Per-connection hygiene: how many connections one client address may hold,
//! and an idle clock on the socket (no bytes either way for too long closes
//! it, for HTTP/1.1, HTTP/2 and spliced WebSockets alike).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Counts open connections per client address.
pub struct PerIpLimit {
    max: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// Holds one connection slot of an address; frees it when dropped.
pub struct IpSlot {
    limit: Arc<PerIpLimit>,
    ip: IpAddr,
}

impl PerIpLimit {
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `ip`, or `None` when it already holds the maximum.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            limit: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Whether bytes moved on a connection: a count of reads and writes that
/// moved any. Counting, not timestamping: a clock read on every read and
/// write was a visible share of the edge's own CPU per request.
#[derive(Clone, Default)]
pub struct Activity {
    moves: Arc<AtomicU64>,
}

/// How many times per idle limit the idle clock looks: a connection closes
/// between the limit and a quarter more after its last byte.
const IDLE_CHECKS: u32 = 4;

impl Activity {
    fn touch(&self) {
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// Resolves once no bytes have moved for `limit` (up to a quarter of
    /// it more).
    pub async fn idle_for(&self, limit: Duration) {
        let step = limit / IDLE_CHECKS;
        let mut seen = self.moves.load(Ordering::Relaxed);
        let mut quiet = 0;
        while quiet < IDLE_CHECKS {
            tokio::time::sleep(step).await;
            let now = self.moves.load(Ordering::Relaxed);
            if now == seen {
                quiet += 1;
            } else {
                (seen, quiet) = (now, 0);
            }
        }
    }
}

/// A socket that reports its traffic to an `Activity`.
pub struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_at_most_its_share_and_slots_come_back() {
        let limit = PerIpLimit::new(2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let s1 = limit.acquire(a).unwrap();
        let _s2 = limit.acquire(a).unwrap();
        assert!(limit.acquire(a).is_none(), "third connection from a");
        assert!(limit.acquire(b).is_some(), "b is counted apart");
        drop(s1);
        assert!(limit.acquire(a).is_some(), "a freed slot is reusable");
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_counts_from_the_last_byte() {
        use tokio::time::Instant;
        let activity = Activity::default();
        let started = Instant::now();
        let client = activity.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            client.touch();
        });
        activity.idle_for(Duration::from_secs(5)).await;
        // Closed between the limit and a quarter more after the last byte.
        let idle = started.elapsed() - Duration::from_secs(3);
        assert!(
            idle >= Duration::from_secs(5) && idle <= Duration::from_millis(6250),
            "closed {idle:?} after the last byte"
        );
    }
}

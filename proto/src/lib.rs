//! Generated gRPC contracts shared by the scheduler, node agents and edges.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("clawdeploy.v1");
}

pub use v1::*;

/// How an agent or an edge reaches the scheduler over mTLS.
pub mod client {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    /// The schedulers to dial, in order of preference. A connection goes to
    /// the one that answered last, and moves on down the list (wrapping)
    /// when it does not answer.
    #[derive(Clone, Debug)]
    pub struct SchedulerEndpoint {
        pub urls: Vec<String>,
        /// Index in `urls` of the scheduler that answered last.
        pub current: Arc<AtomicUsize>,
        /// The name the scheduler's certificate must carry.
        pub server_name: String,
        pub ca_file: PathBuf,
        pub cert_file: PathBuf,
        pub key_file: PathBuf,
    }

    pub type Error = Box<dyn std::error::Error + Send + Sync>;

    impl SchedulerEndpoint {
        /// The scheduler last dialled successfully (or the first).
        pub fn url(&self) -> &str {
            let i = self.current.load(Ordering::Relaxed);
            self.urls.get(i).or(self.urls.first()).map_or("", |s| s)
        }

        /// Dials the scheduler, presenting our certificate and trusting only
        /// our CA. The files are read on every connect, so renewed
        /// certificates take effect on the next session.
        pub async fn connect(&self) -> Result<Channel, Error> {
            let identity = Identity::from_pem(
                tokio::fs::read(&self.cert_file).await?,
                tokio::fs::read(&self.key_file).await?,
            );
            self.dial(Some(identity)).await
        }

        /// Dials without a client certificate (trusting only our CA): the
        /// scheduler answers nothing but `Join` on such a connection.
        pub async fn connect_anonymous(&self) -> Result<Channel, Error> {
            self.dial(None).await
        }

        /// Tries every scheduler once, starting with the one that answered
        /// last; returns the first connection or the last error.
        async fn dial(&self, identity: Option<Identity>) -> Result<Channel, Error> {
            let n = self.urls.len();
            if n == 0 {
                return Err("no scheduler address configured".into());
            }
            let start = self.current.load(Ordering::Relaxed);
            let mut last: Error = "no scheduler answered".into();
            for k in 0..n {
                let i = (start + k) % n;
                match self.dial_one(&self.urls[i], identity.clone()).await {
                    Ok(ch) => {
                        self.current.store(i, Ordering::Relaxed);
                        return Ok(ch);
                    }
                    Err(e) => last = format!("{}: {e}", self.urls[i]).into(),
                }
            }
            Err(last)
        }

        async fn dial_one(&self, url: &str, identity: Option<Identity>) -> Result<Channel, Error> {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(tokio::fs::read(&self.ca_file).await?))
                .domain_name(self.server_name.clone());
            if let Some(identity) = identity {
                tls = tls.identity(identity);
            }
            Ok(Channel::from_shared(url.to_owned())?
                .tls_config(tls)?
                .connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .connect()
                .await?)
        }
    }
}

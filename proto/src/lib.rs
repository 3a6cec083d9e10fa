//! Generated gRPC contracts shared by the scheduler, node agents and edges.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("clawdeploy.v1");
}

pub use v1::*;

/// How an agent or an edge reaches the scheduler over mTLS.
pub mod client {
    use std::path::PathBuf;
    use std::time::Duration;

    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    #[derive(Clone, Debug)]
    pub struct SchedulerEndpoint {
        pub url: String,
        /// The name the scheduler's certificate must carry.
        pub server_name: String,
        pub ca_file: PathBuf,
        pub cert_file: PathBuf,
        pub key_file: PathBuf,
    }

    pub type Error = Box<dyn std::error::Error + Send + Sync>;

    impl SchedulerEndpoint {
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

        async fn dial(&self, identity: Option<Identity>) -> Result<Channel, Error> {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(tokio::fs::read(&self.ca_file).await?))
                .domain_name(self.server_name.clone());
            if let Some(identity) = identity {
                tls = tls.identity(identity);
            }
            Ok(Channel::from_shared(self.url.clone())?
                .tls_config(tls)?
                .connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .connect()
                .await?)
        }
    }
}

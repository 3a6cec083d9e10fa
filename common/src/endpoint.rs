//! The flags that name the scheduler to its clients (the agent, the edge)
//! and the mTLS endpoint they make.

use std::path::Path;

use clawdeploy_proto::client::SchedulerEndpoint;

/// `--scheduler-url` and `--scheduler-name`, with their environment
/// variables.
#[derive(clap::Args, Clone, Debug)]
pub struct SchedulerArgs {
    /// Scheduler gRPC addresses, comma-separated: the client fails over
    /// down the list when the one it uses stops answering.
    #[arg(
        long,
        env = "CLAWDEPLOY_SCHEDULER_URL",
        value_delimiter = ',',
        default_value = "https://127.0.0.1:7443"
    )]
    pub scheduler_url: Vec<String>,
    /// Name the scheduler's certificate must carry.
    #[arg(long, env = "CLAWDEPLOY_SCHEDULER_NAME", default_value = "localhost")]
    pub scheduler_name: String,
}

impl SchedulerArgs {
    /// The endpoint for the client `id` whose files are in `tls_dir`:
    /// `ca.crt.pem`, `<id>.crt.pem` and `<id>.key.pem`.
    pub fn endpoint(&self, tls_dir: &Path, id: &str) -> SchedulerEndpoint {
        SchedulerEndpoint {
            urls: self.scheduler_url.clone(),
            current: Default::default(),
            server_name: self.scheduler_name.clone(),
            ca_file: tls_dir.join("ca.crt.pem"),
            cert_file: tls_dir.join(format!("{id}.crt.pem")),
            key_file: tls_dir.join(format!("{id}.key.pem")),
        }
    }
}

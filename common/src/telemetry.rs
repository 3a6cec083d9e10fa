//! Logs: one line per event on stderr, filtered by `RUST_LOG`.

/// Installs the process's log subscriber; `default_filter` applies when
/// `RUST_LOG` is unset (e.g. `"info,sqlx=warn"`).
pub fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
}

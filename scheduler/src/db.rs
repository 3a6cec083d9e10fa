//! The database: the pools' bounds (the `--db-*` flags) and how a pool is
//! opened (connections checked after idling, generic plans, a statement
//! timeout), and the schema's migrations, embedded at compile time.

use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::PgPoolOptions;
use sqlx_core::error::BoxDynError;
use sqlx_core::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};

use crate::app;
use clawdeploy_common::flags::secs;

/// The database pool's bounds: how many connections, how long a request
/// waits for one, how long a statement may run.
#[derive(Clone, Debug, clap::Args)]
pub struct DbOptions {
    /// Connections in the pool.
    #[arg(
        long = "db-max-connections",
        env = "CLAWDEPLOY_DB_MAX_CONNECTIONS",
        default_value_t = 32
    )]
    pub max_connections: u32,
    /// Connections the pool keeps open even when idle (up to the maximum).
    /// A connection opened under load costs PostgreSQL a new backend's
    /// start-up and cold caches right when it is busiest: a scheduler that
    /// takes bursts of signups keeps them all (`= --db-max-connections`).
    #[arg(
        long = "db-min-connections",
        env = "CLAWDEPLOY_DB_MIN_CONNECTIONS",
        default_value_t = 0
    )]
    pub min_connections: u32,
    /// Connections of the agents' own pool (`App::agents_db`), apart from
    /// the one above: the agents' reports and desired-state pushes run
    /// there, so requests queueing for connections (a burst of signups)
    /// never hold up the work that completes them (0: they share the pool
    /// above). Kept open when `--db-min-connections` is above 0.
    #[arg(
        long = "db-agent-connections",
        env = "CLAWDEPLOY_DB_AGENT_CONNECTIONS",
        default_value_t = 4
    )]
    pub agent_connections: u32,
    /// Seconds a request waits for a pool connection before answering
    /// `503 database_unavailable` (the database away, or the pool busy).
    #[arg(long = "db-acquire-timeout-secs", env = "CLAWDEPLOY_DB_ACQUIRE_TIMEOUT_SECS", default_value = "5", value_parser = secs)]
    pub acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` in seconds for the scheduler's
    /// connections (0: none): no request hangs on a stuck statement.
    #[arg(long = "db-statement-timeout-secs", env = "CLAWDEPLOY_DB_STATEMENT_TIMEOUT_SECS", default_value = "30", value_parser = secs)]
    pub statement_timeout: Duration,
}

/// A pooled connection idle this long is pinged before it is used.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

impl DbOptions {
    /// The request pool and, when `agent_connections` is above 0, the
    /// agents' own (kept open like the other when `min_connections` is).
    pub async fn connect_pools(&self, url: &str) -> Result<app::Pools, sqlx::Error> {
        let requests = self.connect(url).await?;
        if self.agent_connections == 0 {
            return Ok(requests.into());
        }
        let agents = DbOptions {
            max_connections: self.agent_connections,
            min_connections: if self.min_connections > 0 {
                self.agent_connections
            } else {
                0
            },
            ..self.clone()
        }
        .connect(url)
        .await?;
        Ok(app::Pools { requests, agents })
    }

    /// A pool to `url` with these bounds. Connections idle for a second or
    /// more are checked before use (a server restart leaves dead ones in the
    /// pool). The pool keeps `min_connections` open (none by default): an
    /// outage costs nothing but failed attempts and the pool refills on its
    /// own when the server returns.
    pub async fn connect(&self, url: &str) -> Result<sqlx::PgPool, sqlx::Error> {
        let mut connect: sqlx::postgres::PgConnectOptions = url.parse()?;
        // Every statement is prepared once per connection; PostgreSQL then
        // plans it afresh on each of its first five runs (custom plans),
        // and the claim's is a large statement: during a burst on fresh
        // connections, planning was 44% of the database's CPU. Our
        // statements look rows up by key and state literals, so one generic
        // plan per connection serves every value.
        connect = connect.options([("plan_cache_mode", "force_generic_plan")]);
        if !self.statement_timeout.is_zero() {
            connect = connect.options([(
                "statement_timeout",
                format!("{}ms", self.statement_timeout.as_millis()),
            )]);
        }
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(self.min_connections.min(self.max_connections))
            .acquire_timeout(self.acquire_timeout)
            // A connection idle for a while is checked before use (a server
            // restart leaves dead ones in the pool); one in use moments ago
            // is not: under load, checking every acquire doubled the round
            // trips. A connection that died within the last second fails
            // its statement, which answers 503 and is retried.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for < CHECK_IDLE_AFTER {
                        return Ok(true);
                    }
                    use sqlx::Connection;
                    Ok(conn.ping().await.is_ok())
                })
            })
            .connect_with(connect)
            .await
    }
}

/// The migrations in `../migrations`, embedded at compile time
/// (`build.rs`): file name and SQL.
const MIGRATIONS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// The embedded migrations, read as sqlx reads a migrations directory
/// (`<version>_<description>.sql`; a file starting `-- no-transaction`
/// runs outside a transaction), so their checksums are those that
/// `sqlx::migrate!` recorded in databases migrated before.
#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, std::result::Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async { embedded().map_err(BoxDynError::from) })
    }
}

fn embedded() -> std::result::Result<Vec<Migration>, String> {
    let mut all = MIGRATIONS
        .iter()
        .map(|(name, sql)| {
            let (version, rest) = name
                .split_once('_')
                .ok_or_else(|| format!("migration {name:?} is not <version>_<description>.sql"))?;
            let version: i64 = version
                .parse()
                .map_err(|_| format!("migration {name:?}: its version is not a number"))?;
            let kind = MigrationType::from_filename(rest);
            let description = rest.trim_end_matches(kind.suffix()).replace('_', " ");
            let no_tx = sql.starts_with("-- no-transaction");
            Ok(Migration::new(
                version,
                description.into(),
                kind,
                (*sql).into(),
                no_tx,
            ))
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    all.sort_by_key(|m| m.version);
    Ok(all)
}

/// Brings the database's schema up to date (forward only; concurrent
/// schedulers take turns under sqlx's advisory lock).
pub async fn migrate(pool: &sqlx::PgPool) -> std::result::Result<(), MigrateError> {
    Migrator::new(Embedded).await?.run(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded migrations are the directory's as sqlx itself reads it
    /// (so a database `sqlx::migrate!` migrated keeps its checksums).
    #[tokio::test]
    async fn embedded_migrations_are_the_directory_as_sqlx_reads_it() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        let from_disk = Migrator::new(dir.as_path()).await.unwrap();
        let embedded = Migrator::new(Embedded).await.unwrap();
        let view = |m: &Migrator| {
            m.iter()
                .map(|m| {
                    (
                        m.version,
                        m.description.to_string(),
                        m.checksum.to_vec(),
                        m.no_tx,
                        m.migration_type.is_reversible(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(view(&embedded), view(&from_disk));
        assert!(embedded.iter().count() >= 16);
    }
}

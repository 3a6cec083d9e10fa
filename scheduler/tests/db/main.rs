//! The scheduler against PostgreSQL only: no Docker, no agents, no root.
//! Each test gets a fresh database (from `CLAWDEPLOY_TEST_PG`, which
//! `scripts/test` sets) and calls the domain modules directly, or the HTTP
//! router in-process. One test binary; a module per subject.

mod accounts;
mod billing;
mod claims;
mod credits;
mod crypto;
mod deletion;
mod domains;
mod http;
mod idempotency;
mod mail;
mod mfa;
mod profile;
mod reset;
mod routes;
mod sessions;
mod support;
mod verify;

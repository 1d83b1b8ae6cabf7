//! credproxy: a sidecar daemon that keeps third-party credentials in the customer's secrets
//! manager and hands them to local workers over a Unix socket at the moment they are needed.
//!
//! Layout, top-down in the order a request travels (ARCHITECTURE.md has the layer rules and
//! the invariants): `cli` → `daemon` → `server` → `reload` → `control` →
//! `migrate`/`purge`/`setup`/`proxy` (the egress proxy) →
//! `service` → `cache`/`oauth`/`routing`/`access` → `manager` (where secrets live) /
//! `metadata` (the metadata database) → the leaves `config`, `secret`, `time`, `metrics`,
//! `sys` (every `unsafe` block), `lifecycle`, `client`.

pub mod access;
pub mod audit;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod events;
/// Entry points for the fuzz targets in `fuzz/` only; not part of the crate's API.
#[doc(hidden)]
pub mod fuzzing;
pub mod lifecycle;
pub mod manager;
pub mod metadata;
pub mod metrics;
pub mod migrate;
pub mod oauth;
pub mod proxy;
pub mod purge;
pub mod reload;
pub mod routing;
pub mod secret;
pub mod server;
pub mod service;
pub mod setup;
pub mod sys;
pub mod time;

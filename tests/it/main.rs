//! optimus's integration tests: one binary, one module per area, each test
//! against its own real `redis-server` (or cluster) from `optimus_testkit`.
//! The fault, benchmark, cluster and sentinel tests run alone (`.config/nextest.toml`).

use optimus_testkit as support;

mod bench;
mod bridge;
mod cluster;
mod config;
mod control;
mod faults;
mod health;
mod manage;
mod metrics;
mod publish;
mod routes;
mod secure;
mod sentinel;
mod settings;
mod work;

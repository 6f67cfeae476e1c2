//! xlb's control plane: configuration, Maglev, reconciliation, and the
//! loader and maps of the XDP data plane. The `xlb` binary is a thin CLI
//! over this library; tests drive it directly too.

pub mod addr;
pub mod admin;
pub mod cli;
pub mod config;
pub mod consul;
pub mod dataplane;
pub mod decap;
pub mod desired;
pub mod discovery;
pub mod errors;
pub mod files;
pub mod helpers;
pub mod loader;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod overrides;
pub mod reconcile;
pub mod state;
pub mod status;

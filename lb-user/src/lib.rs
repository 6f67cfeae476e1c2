//! xlb's control plane and CLI. The `xlb` binary is a thin shell over this
//! library; tests drive it directly too.
//!
//! Layers, each using only those before it: `model` (shared vocabulary),
//! `config`, `net` (netlink), `dataplane` (the maps' contract and the
//! loader), `discovery`, `control` (desired state, Maglev, reconciler),
//! `observe` (status, metrics, admin API), `daemon`, `cli`.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod errors;
pub mod files;
pub mod model;
pub mod net;
pub mod observe;

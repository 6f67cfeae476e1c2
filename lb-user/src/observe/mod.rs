//! What an operator sees: the status (one family of types, from the
//! daemon's memory or from the pinned maps), its text rendering, the
//! Prometheus exposition, and the admin HTTP API that serves them.

pub mod admin;
pub mod metrics;
pub mod pinned;
pub mod render;
pub mod status;

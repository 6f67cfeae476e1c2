//! The control plane: what is wanted (desired state from config, discovery
//! and overrides), Maglev, and the reconciler that makes the maps match.

pub mod announce;
pub mod desired;
pub mod maglev;
pub mod overrides;
pub mod reconcile;

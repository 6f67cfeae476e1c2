//! The contract with the XDP programs, from the daemon's side: the maps'
//! layout and values in rich types ([`Maps`] over a [`Store`]), what the
//! data plane counts ([`Counters`]), and loading, pinning and attaching
//! programs `xlb` and `xlb_decap`.
//!
//! Nothing above this module sees a wire value, a table number or a flag
//! bit.

pub mod conntrack;
pub mod counters;
pub mod decap;
pub mod kernel;
pub mod loader;
pub mod maps;
pub mod store;
pub mod wire;

pub use counters::Counters;
#[cfg(test)]
pub use counters::MemoryCounters;
pub use kernel::{KernelCounters, KernelStore};
pub use maps::{BackendSlot, Maps};
#[cfg(test)]
pub use store::MemoryStore;
pub use store::{DataplaneError, StatsOf, Store};
pub use wire::{BackendEntry, BackendId, BackendUse, NO_BACKEND, Previous, Side, VipEntry, VipId, WireError};

/// The maps in memory, for tests of everything above the data plane.
#[cfg(test)]
pub type MemoryMaps = Maps<MemoryStore>;

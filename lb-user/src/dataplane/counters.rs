//! What the data plane counts, summed over CPUs: per verdict reason and
//! event, per VIP, per backend, and the connection table's fill.

#[cfg(test)]
use std::{collections::BTreeMap, sync::Mutex};

use lb_common::{BackendId, Counter, GlobalStats};

use super::{store::DataplaneError, wire::VipId};

pub trait Counters {
    /// Global counters (the flood guard's window fields are not meaningful summed).
    fn global(&self) -> Result<GlobalStats, DataplaneError>;
    fn vip(&self, id: VipId) -> Result<Counter, DataplaneError>;
    fn backend(&self, id: BackendId) -> Result<Counter, DataplaneError>;
    /// Entries in the connection table (a walk of it: O(entries)).
    fn conntrack_entries(&self) -> usize;
}

/// Counters set by hand, for tests of everything that shows them.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct MemoryCounters {
    pub values: Mutex<MemoryValues>,
}

#[cfg(test)]
#[derive(Debug, Default)]
pub struct MemoryValues {
    pub global: GlobalStats,
    pub vips: BTreeMap<VipId, Counter>,
    pub backends: BTreeMap<BackendId, Counter>,
    pub conntrack_entries: usize,
}

#[cfg(test)]
impl MemoryCounters {
    fn with<R>(&self, f: impl FnOnce(&MemoryValues) -> R) -> R {
        f(&self.values.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
impl Counters for MemoryCounters {
    fn global(&self) -> Result<GlobalStats, DataplaneError> {
        Ok(self.with(|v| v.global))
    }

    fn vip(&self, id: VipId) -> Result<Counter, DataplaneError> {
        Ok(self.with(|v| v.vips.get(&id).copied().unwrap_or_default()))
    }

    fn backend(&self, id: BackendId) -> Result<Counter, DataplaneError> {
        Ok(self.with(|v| v.backends.get(&id).copied().unwrap_or_default()))
    }

    fn conntrack_entries(&self) -> usize {
        self.with(|v| v.conntrack_entries)
    }
}

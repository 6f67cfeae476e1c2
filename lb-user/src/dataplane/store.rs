//! The maps' raw storage: one `Store` trait over the kernel's maps
//! (`kernel::KernelStore`) and, for unit tests, an in-memory stand-in with
//! the same semantics (`MemoryStore`), so everything above is tested
//! without a kernel. A store knows map names and wire values, nothing of
//! layout.

#[cfg(test)]
use std::collections::BTreeMap;

use aya::maps::MapError;
#[cfg(test)]
use lb_common::maps;
use lb_common::{BackendId, BackendInfo, MaglevChunk, VipInfo, VipKey};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("map {map}: {op} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map} is missing from the loaded object")]
    Missing { map: &'static str },
    #[error("cannot open pinned map {path}")]
    Pinned {
        path: std::path::PathBuf,
        #[source]
        source: MapError,
    },
    #[error("cannot duplicate the descriptor of map {map}")]
    Dup {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {map} into memory")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
    #[error(
        "the maps pinned under {dir} have layout {found}, this xlb reads layout {wanted} \
         (see Upgrading in the README: `xlb detach` once)"
    )]
    Layout { dir: std::path::PathBuf, found: u32, wanted: u32 },
}

pub(crate) fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, op, source }
}

/// Per-id counters a store can zero when an id gets a new owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsOf {
    Vip,
    Backend,
}

/// Reads and writes of the maps the daemon keeps. Errors are returned,
/// never swallowed: the reconciler answers a failed write with a resync.
pub trait Store {
    fn vip_put(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError>;
    /// Deleting a key that is not there succeeds.
    fn vip_delete(&mut self, key: &VipKey) -> Result<(), DataplaneError>;
    fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>, DataplaneError>;
    fn backend_put(&mut self, id: BackendId, info: &BackendInfo) -> Result<(), DataplaneError>;
    fn backend_get(&self, id: BackendId) -> Result<BackendInfo, DataplaneError>;
    /// Every entry that is not all zero.
    fn backend_entries(&self) -> Result<Vec<(BackendId, BackendInfo)>, DataplaneError>;
    fn chunk_put(&mut self, index: u32, chunk: &MaglevChunk) -> Result<(), DataplaneError>;
    fn chunk_get(&self, index: u32) -> Result<MaglevChunk, DataplaneError>;
    fn filter_put(&mut self, word: u32, bits: u64) -> Result<(), DataplaneError>;
    fn stats_reset(&mut self, of: StatsOf, id: u32) -> Result<(), DataplaneError>;
}

/// Maps in memory with the kernel's semantics, instrumented for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct MemoryStore {
    pub vips: BTreeMap<VipKey, VipInfo>,
    pub backends: BTreeMap<BackendId, BackendInfo>,
    pub chunks: BTreeMap<u32, MaglevChunk>,
    pub filter: BTreeMap<u32, u64>,
    pub stats_resets: Vec<(StatsOf, u32)>,
    /// Chunk writes so far (to check that updates write only differences).
    pub chunk_writes: usize,
    /// When set, the next write fails once (to exercise resync).
    pub fail_next_write: bool,
    /// When set, every write fails.
    pub fail_writes: bool,
    /// When set, each write appends its map's name to `writes`, and each
    /// backend entry to `backend_writes`, to check the order of writes.
    pub log_writes: bool,
    pub writes: Vec<&'static str>,
    pub backend_writes: Vec<BackendInfo>,
}

#[cfg(test)]
impl MemoryStore {
    fn write(&mut self, map: &'static str) -> Result<(), DataplaneError> {
        if self.log_writes {
            self.writes.push(map);
        }
        if std::mem::take(&mut self.fail_next_write) || self.fail_writes {
            return Err(DataplaneError::Map { map, op: "write", source: MapError::KeyNotFound });
        }
        Ok(())
    }
}

#[cfg(test)]
impl Store for MemoryStore {
    fn vip_put(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        self.write(maps::VIPS)?;
        self.vips.insert(*key, *info);
        Ok(())
    }

    fn vip_delete(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.write(maps::VIPS)?;
        self.vips.remove(key);
        Ok(())
    }

    fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>, DataplaneError> {
        Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backend_put(&mut self, id: BackendId, info: &BackendInfo) -> Result<(), DataplaneError> {
        // Whatever the order of writes, no packet may ever be sent to a
        // zero MAC.
        let unaddressed = info.mode() == lb_common::MODE_DR && info.mac == [0; 6];
        assert!(
            !(info.takes_established() && unaddressed),
            "BACKENDS[{id}]: DR entry without a MAC: {info:?}"
        );
        self.write(maps::BACKENDS)?;
        if self.log_writes {
            self.backend_writes.push(*info);
        }
        self.backends.insert(id, *info);
        Ok(())
    }

    fn backend_get(&self, id: BackendId) -> Result<BackendInfo, DataplaneError> {
        Ok(self.backends.get(&id).copied().unwrap_or_default())
    }

    fn backend_entries(&self) -> Result<Vec<(BackendId, BackendInfo)>, DataplaneError> {
        Ok(self
            .backends
            .iter()
            .filter(|(_, b)| **b != BackendInfo::default())
            .map(|(id, b)| (*id, *b))
            .collect())
    }

    fn chunk_put(&mut self, index: u32, chunk: &MaglevChunk) -> Result<(), DataplaneError> {
        self.write(maps::MAGLEV)?;
        self.chunks.insert(index, *chunk);
        self.chunk_writes += 1;
        Ok(())
    }

    fn chunk_get(&self, index: u32) -> Result<MaglevChunk, DataplaneError> {
        Ok(self.chunks.get(&index).copied().unwrap_or_default())
    }

    fn filter_put(&mut self, word: u32, bits: u64) -> Result<(), DataplaneError> {
        self.write(maps::VIP_FILTER)?;
        self.filter.insert(word, bits);
        Ok(())
    }

    fn stats_reset(&mut self, of: StatsOf, id: u32) -> Result<(), DataplaneError> {
        self.stats_resets.push((of, id));
        Ok(())
    }
}

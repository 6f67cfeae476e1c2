//! The kernel maps, behind the `MapWriter` trait the reconciler writes
//! through. `KernelMaps` is the real thing (owned by a loaded program or
//! opened from pins); `MemoryMaps` stands in for it in tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use lb_common::{
    BackendId, BackendInfo, ConnEntry, Counter, FlowKey, GlobalStats, MAGLEV_LANES, MaglevChunk, Meta,
    VIP_FILTER_WORDS, VipInfo, VipKey, limits::TABLES_PER_VIP, maps, vip_filter_bit,
};

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
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, op, source }
}

/// Capacities of a set of maps, as recorded in `META`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub conntrack_size: u32,
}

impl Geometry {
    /// `MaglevChunk`s per table.
    pub fn table_chunks(&self) -> u32 {
        self.table_size.div_ceil(MAGLEV_LANES)
    }

    /// Entries of the `MAGLEV` map.
    pub fn maglev_entries(&self) -> u32 {
        self.max_vips * TABLES_PER_VIP * self.table_chunks()
    }

    pub fn meta(&self) -> Meta {
        Meta {
            layout: lb_common::LAYOUT_VERSION,
            table_size: self.table_size,
            max_vips: self.max_vips,
            max_backends: self.max_backends,
            conntrack_size: self.conntrack_size,
            _pad: 0,
        }
    }

    pub fn from_meta(meta: &Meta) -> Self {
        Self {
            table_size: meta.table_size,
            max_vips: meta.max_vips,
            max_backends: meta.max_backends,
            conntrack_size: meta.conntrack_size,
        }
    }
}

/// Writes the reconciler makes. Errors are returned, never swallowed: the
/// reconciler answers a failed write with a full resync.
pub trait MapWriter {
    fn put_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError>;
    fn delete_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError>;
    fn vip_keys(&self) -> Result<Vec<VipKey>, DataplaneError>;
    fn put_backend(&mut self, id: BackendId, info: &BackendInfo) -> Result<(), DataplaneError>;
    /// Writes chunk `index` of the `MAGLEV` map (table × chunks + offset).
    fn put_chunk(&mut self, index: u32, chunk: &MaglevChunk) -> Result<(), DataplaneError>;
    fn reset_vip_stats(&mut self, id: u32) -> Result<(), DataplaneError>;
    fn reset_backend_stats(&mut self, id: BackendId) -> Result<(), DataplaneError>;
}

/// Reads of the live state: for adoption after a restart, and for status.
pub trait MapReader {
    fn vips(&self) -> Result<Vec<(VipKey, VipInfo)>, DataplaneError>;
    fn backend(&self, id: BackendId) -> Result<BackendInfo, DataplaneError>;
    /// Every backend entry in use (non-zero flags or generation).
    fn backends(&self) -> Result<Vec<(BackendId, BackendInfo)>, DataplaneError>;
    fn chunk(&self, index: u32) -> Result<MaglevChunk, DataplaneError>;
}

pub struct KernelMaps {
    vips: HashMap<MapData, VipKey, VipInfo>,
    backends: Array<MapData, BackendInfo>,
    maglev: Array<MapData, MaglevChunk>,
    stats: PerCpuArray<MapData, GlobalStats>,
    conntrack: HashMap<MapData, FlowKey, ConnEntry>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    meta: Array<MapData, Meta>,
    vip_filter: Array<MapData, u64>,
    /// The VIP keys `vip_filter` was last written for; `None` until the
    /// first VIP write, and after a failed filter write (then rebuilt
    /// whole from `vips`).
    filtered: Option<BTreeSet<VipKey>>,
    cpus: usize,
}

impl KernelMaps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Self::build(|name| ebpf.take_map(name).ok_or(DataplaneError::Missing { map: name }))
    }

    /// Opens the maps pinned under `dir` (for `xlb status` and friends).
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Self::build(|name| {
            let path = dir.join(name);
            MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .map_err(|source| DataplaneError::Pinned { path, source })
        })
    }

    fn build(
        mut get: impl FnMut(&'static str) -> Result<Map, DataplaneError>,
    ) -> Result<Self, DataplaneError> {
        macro_rules! typed {
            ($name:expr) => {{
                let name = $name;
                get(name)?.try_into().map_err(map_err(name, "open"))?
            }};
        }
        Ok(Self {
            vips: typed!(maps::VIPS),
            backends: typed!(maps::BACKENDS),
            maglev: typed!(maps::MAGLEV),
            stats: typed!(maps::STATS),
            conntrack: typed!(maps::CONNTRACK),
            vip_stats: typed!(maps::VIP_STATS),
            backend_stats: typed!(maps::BACKEND_STATS),
            meta: typed!(maps::META),
            vip_filter: typed!(maps::VIP_FILTER),
            filtered: None,
            cpus: aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::Cpus(format!("{what}: {e}")))?,
        })
    }

    pub fn meta(&self) -> Result<Meta, DataplaneError> {
        self.meta.get(&0, 0).map_err(map_err(maps::META, "read"))
    }

    pub fn set_meta(&mut self, meta: &Meta) -> Result<(), DataplaneError> {
        self.meta.set(0, meta, 0).map_err(map_err(maps::META, "write"))
    }

    fn sum(
        map: &PerCpuArray<MapData, Counter>,
        name: &'static str,
        index: u32,
    ) -> Result<Counter, DataplaneError> {
        let values = map.get(&index, 0).map_err(map_err(name, "read"))?;
        let mut total = Counter::default();
        for v in values.iter() {
            total += *v;
        }
        Ok(total)
    }

    /// Global counters summed over CPUs (the flood-guard fields are not
    /// meaningful summed).
    pub fn global_stats(&self) -> Result<GlobalStats, DataplaneError> {
        let values = self.stats.get(&0, 0).map_err(map_err(maps::STATS, "read"))?;
        let mut total = GlobalStats::default();
        for v in values.iter() {
            for (t, c) in total.reasons.iter_mut().zip(&v.reasons) {
                *t += *c;
            }
            for (t, c) in total.events.iter_mut().zip(&v.events) {
                *t += *c;
            }
        }
        Ok(total)
    }

    /// Entries in the connection table (walks it: O(entries)).
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    pub fn vip_stats(&self, id: u32) -> Result<Counter, DataplaneError> {
        Self::sum(&self.vip_stats, maps::VIP_STATS, id)
    }

    pub fn backend_stats(&self, id: BackendId) -> Result<Counter, DataplaneError> {
        Self::sum(&self.backend_stats, maps::BACKEND_STATS, id as u32)
    }

    /// The filter's words, as the data plane sees them.
    pub fn vip_filter(&self) -> Result<Vec<u64>, DataplaneError> {
        self.vip_filter.iter().collect::<Result<_, _>>().map_err(map_err(maps::VIP_FILTER, "read"))
    }

    /// Writes word `word` of the filter from `keys`.
    fn write_filter_word(&mut self, keys: &BTreeSet<VipKey>, word: u32) -> Result<(), DataplaneError> {
        let bits = keys
            .iter()
            .map(|k| vip_filter_bit(&k.addr, k.family))
            .filter(|bit| bit / 64 == word)
            .fold(0u64, |w, bit| w | 1 << (bit % 64));
        self.vip_filter.set(word, bits, 0).map_err(map_err(maps::VIP_FILTER, "write"))
    }

    /// Adds (`present`) or removes `key` in the filter. A bit is set before
    /// its VIP exists and cleared after it is gone, so no VIP packet ever
    /// meets a clear bit.
    fn update_filter(&mut self, key: &VipKey, present: bool) -> Result<(), DataplaneError> {
        let mut keys = match self.filtered.take() {
            Some(keys) => keys,
            None => {
                // First write, or after a failed one: rewrite every word.
                let keys: BTreeSet<VipKey> = self.vip_keys()?.into_iter().collect();
                for word in 0..VIP_FILTER_WORDS {
                    self.write_filter_word(&keys, word)?;
                }
                keys
            }
        };
        let changed = if present { keys.insert(*key) } else { keys.remove(key) };
        if changed {
            self.write_filter_word(&keys, vip_filter_bit(&key.addr, key.family) / 64)?;
        }
        self.filtered = Some(keys);
        Ok(())
    }

    fn zeroes(&self) -> Result<PerCpuValues<Counter>, DataplaneError> {
        PerCpuValues::try_from(vec![Counter::default(); self.cpus])
            .map_err(|e| DataplaneError::Cpus(e.to_string()))
    }
}

impl MapWriter for KernelMaps {
    fn put_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        self.update_filter(key, true)?;
        self.vips.insert(key, info, 0).map_err(map_err(maps::VIPS, "write"))
    }

    fn delete_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        match self.vips.remove(key) {
            Err(MapError::KeyNotFound) => Ok(()),
            r => r.map_err(map_err(maps::VIPS, "delete")),
        }?;
        self.update_filter(key, false)
    }

    fn vip_keys(&self) -> Result<Vec<VipKey>, DataplaneError> {
        self.vips.keys().collect::<Result<_, _>>().map_err(map_err(maps::VIPS, "iterate"))
    }

    fn put_backend(&mut self, id: BackendId, info: &BackendInfo) -> Result<(), DataplaneError> {
        self.backends.set(id as u32, info, 0).map_err(map_err(maps::BACKENDS, "write"))
    }

    fn put_chunk(&mut self, index: u32, chunk: &MaglevChunk) -> Result<(), DataplaneError> {
        self.maglev.set(index, chunk, 0).map_err(map_err(maps::MAGLEV, "write"))
    }

    fn reset_vip_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        let zeroes = self.zeroes()?;
        self.vip_stats.set(id, zeroes, 0).map_err(map_err(maps::VIP_STATS, "write"))
    }

    fn reset_backend_stats(&mut self, id: BackendId) -> Result<(), DataplaneError> {
        let zeroes = self.zeroes()?;
        self.backend_stats.set(id as u32, zeroes, 0).map_err(map_err(maps::BACKEND_STATS, "write"))
    }
}

impl MapReader for KernelMaps {
    fn vips(&self) -> Result<Vec<(VipKey, VipInfo)>, DataplaneError> {
        self.vips.iter().collect::<Result<_, _>>().map_err(map_err(maps::VIPS, "iterate"))
    }

    fn backend(&self, id: BackendId) -> Result<BackendInfo, DataplaneError> {
        self.backends.get(&(id as u32), 0).map_err(map_err(maps::BACKENDS, "read"))
    }

    fn backends(&self) -> Result<Vec<(BackendId, BackendInfo)>, DataplaneError> {
        let mut used = Vec::new();
        for (id, info) in self.backends.iter().enumerate() {
            let info = info.map_err(map_err(maps::BACKENDS, "read"))?;
            if info != BackendInfo::default() {
                used.push((id as BackendId, info));
            }
        }
        Ok(used)
    }

    fn chunk(&self, index: u32) -> Result<MaglevChunk, DataplaneError> {
        self.maglev.get(&index, 0).map_err(map_err(maps::MAGLEV, "read"))
    }
}

/// In-memory maps with the kernel's semantics, for tests of everything
/// above the data plane.
#[derive(Debug, Default)]
pub struct MemoryMaps {
    pub vips: BTreeMap<VipKey, VipInfo>,
    pub backends: BTreeMap<BackendId, BackendInfo>,
    pub chunks: BTreeMap<u32, MaglevChunk>,
    pub vip_stats_resets: Vec<u32>,
    pub backend_stats_resets: Vec<BackendId>,
    /// Chunk writes so far (to check that updates write only differences).
    pub chunk_writes: usize,
    /// When set, the next write fails once (to exercise resync).
    pub fail_next_write: bool,
    /// When set, each write appends its map's kind ("vip", "backend",
    /// "chunk") to `writes`, to check the order of writes.
    pub log_writes: bool,
    pub writes: Vec<&'static str>,
    /// With `log_writes`: every backend entry written, in order.
    pub backend_writes: Vec<BackendInfo>,
}

impl MemoryMaps {
    fn write(&mut self, map: &'static str) -> Result<(), DataplaneError> {
        if self.log_writes {
            self.writes.push(match map {
                maps::VIPS => "vip",
                maps::BACKENDS => "backend",
                _ => "chunk",
            });
        }
        if std::mem::take(&mut self.fail_next_write) {
            return Err(DataplaneError::Map { map, op: "write", source: MapError::KeyNotFound });
        }
        Ok(())
    }

    /// The table a VIP's packets are balanced with right now.
    pub fn live_table(&self, key: &VipKey, geometry: &Geometry) -> Option<Vec<BackendId>> {
        let info = self.vips.get(key)?;
        let chunks = geometry.table_chunks();
        Some(
            (0..chunks)
                .flat_map(|c| self.chunks.get(&(info.table * chunks + c)).copied().unwrap_or_default())
                .take(geometry.table_size as usize)
                .collect(),
        )
    }
}

impl MapWriter for MemoryMaps {
    fn put_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        self.write(maps::VIPS)?;
        self.vips.insert(*key, *info);
        Ok(())
    }

    fn delete_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.write(maps::VIPS)?;
        self.vips.remove(key);
        Ok(())
    }

    fn vip_keys(&self) -> Result<Vec<VipKey>, DataplaneError> {
        Ok(self.vips.keys().copied().collect())
    }

    fn put_backend(&mut self, id: BackendId, info: &BackendInfo) -> Result<(), DataplaneError> {
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

    fn put_chunk(&mut self, index: u32, chunk: &MaglevChunk) -> Result<(), DataplaneError> {
        self.write(maps::MAGLEV)?;
        self.chunks.insert(index, *chunk);
        self.chunk_writes += 1;
        Ok(())
    }

    fn reset_vip_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.vip_stats_resets.push(id);
        Ok(())
    }

    fn reset_backend_stats(&mut self, id: BackendId) -> Result<(), DataplaneError> {
        self.backend_stats_resets.push(id);
        Ok(())
    }
}

impl MapReader for MemoryMaps {
    fn vips(&self) -> Result<Vec<(VipKey, VipInfo)>, DataplaneError> {
        Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backend(&self, id: BackendId) -> Result<BackendInfo, DataplaneError> {
        Ok(self.backends.get(&id).copied().unwrap_or_default())
    }

    fn backends(&self) -> Result<Vec<(BackendId, BackendInfo)>, DataplaneError> {
        Ok(self.backends.iter().map(|(id, b)| (*id, *b)).collect())
    }

    fn chunk(&self, index: u32) -> Result<MaglevChunk, DataplaneError> {
        Ok(self.chunks.get(&index).copied().unwrap_or_default())
    }
}

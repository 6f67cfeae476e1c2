//! The kernel's maps: [`KernelStore`] for what the daemon writes, and
//! [`KernelCounters`] for what the data plane counts, each with its own
//! descriptors so the admin API reads counters while the daemon writes.

use std::{os::fd::AsFd as _, path::Path};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use lb_common::{BackendId, BackendInfo, Counter, GlobalStats, MaglevChunk, Meta, VipInfo, VipKey, maps};

use super::{
    Maps,
    conntrack::ConnTable,
    counters::Counters,
    store::{DataplaneError, StatsOf, Store, map_err},
    wire::VipId,
};

pub struct KernelStore {
    vips: HashMap<MapData, VipKey, VipInfo>,
    backends: Array<MapData, BackendInfo>,
    maglev: Array<MapData, MaglevChunk>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    meta: Array<MapData, Meta>,
    vip_filter: Array<MapData, u64>,
    cpus: usize,
}

/// Read-only handles on the counting maps.
pub struct KernelCounters {
    stats: PerCpuArray<MapData, GlobalStats>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    conntrack: ConnTable,
}

/// Opens map `name` as type `T`, from `get`.
pub(super) fn typed<T: TryFrom<Map, Error = MapError>>(
    get: &mut impl FnMut(&'static str) -> Result<Map, DataplaneError>,
    name: &'static str,
) -> Result<T, DataplaneError> {
    get(name)?.try_into().map_err(map_err(name, "open"))
}

/// A second handle on the map behind `map`.
fn dup<K: aya::Pod, V, M: IterableMap<K, V>, T: TryFrom<Map, Error = MapError>>(
    map: &M,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DataplaneError::Dup { map: name, source })?;
    let data = MapData::from_fd(fd).map_err(map_err(name, "open"))?;
    Map::from_map_data(data).and_then(T::try_from).map_err(map_err(name, "open"))
}

/// Opens the maps pinned under `dir`, by name.
pub(super) fn pinned(dir: &Path) -> impl FnMut(&'static str) -> Result<Map, DataplaneError> + '_ {
    move |name| {
        let path = dir.join(name);
        MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .map_err(|source| DataplaneError::Pinned { path, source })
    }
}

impl KernelStore {
    /// Takes the maps out of a freshly loaded object, with counters that
    /// share them (`conntrack_seed`: the one the program was loaded with).
    pub fn take(ebpf: &mut Ebpf, conntrack_seed: u32) -> Result<(Self, KernelCounters), DataplaneError> {
        let mut get = |name| ebpf.take_map(name).ok_or(DataplaneError::Missing { map: name });
        let store = Self::build(&mut get)?;
        let counters = KernelCounters {
            stats: typed(&mut get, maps::STATS)?,
            conntrack: ConnTable::new(typed(&mut get, maps::CONNTRACK)?, conntrack_seed),
            vip_stats: dup(&store.vip_stats, maps::VIP_STATS)?,
            backend_stats: dup(&store.backend_stats, maps::BACKEND_STATS)?,
        };
        Ok((store, counters))
    }

    /// Opens the maps pinned under `dir` (for `xlb status` and adoption checks).
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Self::build(&mut pinned(dir))
    }

    fn build(
        get: &mut impl FnMut(&'static str) -> Result<Map, DataplaneError>,
    ) -> Result<Self, DataplaneError> {
        Ok(Self {
            vips: typed(get, maps::VIPS)?,
            backends: typed(get, maps::BACKENDS)?,
            maglev: typed(get, maps::MAGLEV)?,
            vip_stats: typed(get, maps::VIP_STATS)?,
            backend_stats: typed(get, maps::BACKEND_STATS)?,
            meta: typed(get, maps::META)?,
            vip_filter: typed(get, maps::VIP_FILTER)?,
            cpus: aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::Cpus(format!("{what}: {e}")))?,
        })
    }

    pub fn meta(&self) -> Result<Meta, DataplaneError> {
        self.meta.get(&0, 0).map_err(map_err(maps::META, "read"))
    }

    pub fn set_meta(&mut self, meta: &Meta) -> Result<(), DataplaneError> {
        self.meta.set(0, meta, 0).map_err(map_err(maps::META, "write"))
    }

    /// The filter's words, as the data plane sees them.
    pub fn vip_filter(&self) -> Result<Vec<u64>, DataplaneError> {
        self.vip_filter.iter().collect::<Result<_, _>>().map_err(map_err(maps::VIP_FILTER, "read"))
    }
}

impl Maps<KernelStore> {
    /// The maps pinned under `dir`, with the capacities their `META` records.
    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        let store = KernelStore::open(dir)?;
        let caps = super::loader::capacities(&store.meta()?);
        Ok(Maps::new(store, caps))
    }
}

impl Store for KernelStore {
    fn vip_put(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        self.vips.insert(key, info, 0).map_err(map_err(maps::VIPS, "write"))
    }

    fn vip_delete(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        match self.vips.remove(key) {
            Err(MapError::KeyNotFound) => Ok(()),
            r => r.map_err(map_err(maps::VIPS, "delete")),
        }
    }

    fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>, DataplaneError> {
        self.vips.iter().collect::<Result<_, _>>().map_err(map_err(maps::VIPS, "iterate"))
    }

    fn backend_put(&mut self, id: BackendId, info: &BackendInfo) -> Result<(), DataplaneError> {
        self.backends.set(id as u32, info, 0).map_err(map_err(maps::BACKENDS, "write"))
    }

    fn backend_get(&self, id: BackendId) -> Result<BackendInfo, DataplaneError> {
        self.backends.get(&(id as u32), 0).map_err(map_err(maps::BACKENDS, "read"))
    }

    fn backend_entries(&self) -> Result<Vec<(BackendId, BackendInfo)>, DataplaneError> {
        let mut used = Vec::new();
        for (id, info) in self.backends.iter().enumerate() {
            let info = info.map_err(map_err(maps::BACKENDS, "read"))?;
            if info != BackendInfo::default() {
                used.push((id as BackendId, info));
            }
        }
        Ok(used)
    }

    fn chunk_put(&mut self, index: u32, chunk: &MaglevChunk) -> Result<(), DataplaneError> {
        self.maglev.set(index, chunk, 0).map_err(map_err(maps::MAGLEV, "write"))
    }

    fn chunk_get(&self, index: u32) -> Result<MaglevChunk, DataplaneError> {
        self.maglev.get(&index, 0).map_err(map_err(maps::MAGLEV, "read"))
    }

    fn filter_put(&mut self, word: u32, bits: u64) -> Result<(), DataplaneError> {
        self.vip_filter.set(word, bits, 0).map_err(map_err(maps::VIP_FILTER, "write"))
    }

    fn stats_reset(&mut self, of: StatsOf, id: u32) -> Result<(), DataplaneError> {
        let zeroes = PerCpuValues::try_from(vec![Counter::default(); self.cpus])
            .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
        let (map, name) = match of {
            StatsOf::Vip => (&mut self.vip_stats, maps::VIP_STATS),
            StatsOf::Backend => (&mut self.backend_stats, maps::BACKEND_STATS),
        };
        map.set(id, zeroes, 0).map_err(map_err(name, "write"))
    }
}

impl KernelCounters {
    /// The connection table.
    pub fn conntrack(&self) -> &ConnTable {
        &self.conntrack
    }

    /// Opens the counting maps pinned under `dir`.
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        let mut get = pinned(dir);
        Ok(KernelCounters {
            stats: typed(&mut get, maps::STATS)?,
            vip_stats: typed(&mut get, maps::VIP_STATS)?,
            backend_stats: typed(&mut get, maps::BACKEND_STATS)?,
            conntrack: ConnTable::open(dir)?,
        })
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
}

impl Counters for KernelCounters {
    fn global(&self) -> Result<GlobalStats, DataplaneError> {
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

    fn vip(&self, id: VipId) -> Result<Counter, DataplaneError> {
        Self::sum(&self.vip_stats, maps::VIP_STATS, id)
    }

    fn backend(&self, id: BackendId) -> Result<Counter, DataplaneError> {
        Self::sum(&self.backend_stats, maps::BACKEND_STATS, id as u32)
    }

    fn conntrack_entries(&self) -> usize {
        // A table that cannot be mapped counts as empty; the failure is logged.
        self.conntrack.entries().unwrap_or_else(|e| {
            tracing::warn!("{e}");
            0
        })
    }
}

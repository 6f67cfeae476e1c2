//! The maps as the control plane sees them: VIPs, backends and Maglev
//! tables in rich types, over any [`Store`]. The layout lives here and only
//! here: which `MAGLEV` chunks hold a table, how backend ids pack into
//! chunks, and the `VIP_FILTER` bitmap kept in step with `VIPS`.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    BackendInfo, MAGLEV_LANES, MaglevChunk, VIP_FILTER_WORDS, VipInfo, VipKey, limits::TABLES_PER_VIP,
    vip_filter_bit,
};

use super::{
    store::{DataplaneError, StatsOf, Store},
    wire::{BackendEntry, BackendId, NO_BACKEND, Side, VipEntry, VipId, WireError, table_number},
};
use crate::{config::Capacities, model::VipAddr};

/// `MaglevChunk`s per table.
pub fn table_chunks(caps: &Capacities) -> u32 {
    caps.table_size.div_ceil(MAGLEV_LANES)
}

/// Entries of the `MAGLEV` map.
pub fn maglev_entries(caps: &Capacities) -> u32 {
    caps.max_vips * TABLES_PER_VIP * table_chunks(caps)
}

/// A map entry as it decoded: a rich value, or what it is and why it did not.
pub type Decoded<K, V> = Result<(K, V), (String, WireError)>;

/// A `BACKENDS` entry: its generation, which every entry has, and what it
/// decodes to.
#[derive(Debug)]
pub struct BackendSlot {
    pub id: BackendId,
    pub generation: u32,
    pub entry: Result<BackendEntry, WireError>,
}

pub struct Maps<S> {
    store: S,
    caps: Capacities,
    /// The VIP keys `VIP_FILTER` was last written for; `None` until the
    /// first VIP write, and after a failed filter write (then rebuilt
    /// whole from `VIPS`).
    filtered: Option<BTreeSet<VipKey>>,
}

impl<S: Store> Maps<S> {
    pub fn new(store: S, caps: Capacities) -> Self {
        Maps { store, caps, filtered: None }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    pub fn capacities(&self) -> Capacities {
        self.caps
    }

    /// The store, for another layout-keeping wrapper (the benchmark's
    /// write-counting one, say).
    pub fn into_store(self) -> S {
        self.store
    }

    /// Writes a VIP's entry; its filter bit is set first, so no packet to
    /// it ever meets a clear bit.
    pub fn put_vip(&mut self, addr: &VipAddr, entry: &VipEntry) -> Result<(), DataplaneError> {
        let key = VipKey::from(addr);
        self.update_filter(&key, true)?;
        self.store.vip_put(&key, &VipInfo::from(entry))
    }

    /// Removes a VIP's entry, then its filter bit.
    pub fn delete_vip(&mut self, addr: &VipAddr) -> Result<(), DataplaneError> {
        self.delete_key(&VipKey::from(addr))
    }

    fn delete_key(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.store.vip_delete(key)?;
        self.update_filter(key, false)
    }

    /// Every VIP entry, decoded.
    pub fn vips(&self) -> Result<Vec<Decoded<VipAddr, VipEntry>>, DataplaneError> {
        Ok(self
            .store
            .vip_entries()?
            .iter()
            .map(|(key, info)| {
                let addr = VipAddr::try_from(key).map_err(|e| (format!("{key:?}"), e))?;
                let entry = VipEntry::try_from(info).map_err(|e| (addr.to_string(), e))?;
                Ok((addr, entry))
            })
            .collect())
    }

    /// Deletes every VIP entry that does not decode or that `keep` rejects
    /// (left by something else, or by a run that crashed mid-way).
    pub fn delete_vips_except(&mut self, keep: impl Fn(&VipAddr) -> bool) -> Result<(), DataplaneError> {
        for (key, _) in self.store.vip_entries()? {
            if !VipAddr::try_from(&key).is_ok_and(|addr| keep(&addr)) {
                self.delete_key(&key)?;
            }
        }
        Ok(())
    }

    pub fn put_backend(&mut self, id: BackendId, entry: &BackendEntry) -> Result<(), DataplaneError> {
        self.store.backend_put(id, &BackendInfo::from(entry))
    }

    pub fn backend(&self, id: BackendId) -> Result<Result<BackendEntry, WireError>, DataplaneError> {
        Ok(BackendEntry::try_from(&self.store.backend_get(id)?))
    }

    /// Every backend entry in use or holding a generation, decoded.
    pub fn backends(&self) -> Result<Vec<BackendSlot>, DataplaneError> {
        Ok(self
            .store
            .backend_entries()?
            .iter()
            .map(|(id, info)| BackendSlot {
                id: *id,
                generation: info.generation,
                entry: BackendEntry::try_from(info),
            })
            .collect())
    }

    /// Writes `table` as `vip`'s table `side`, skipping the chunks where
    /// `previous` (what that table is known to hold) already has the ids.
    pub fn write_table(
        &mut self,
        vip: VipId,
        side: Side,
        table: &[BackendId],
        previous: Option<&[BackendId]>,
    ) -> Result<(), DataplaneError> {
        let lanes = MAGLEV_LANES as usize;
        let base = table_number(vip, side) * table_chunks(&self.caps);
        for (c, ids) in table.chunks(lanes).enumerate() {
            if previous.is_some_and(|p| p.get(c * lanes..c * lanes + ids.len()) == Some(ids)) {
                continue;
            }
            let mut chunk: MaglevChunk = [NO_BACKEND; MAGLEV_LANES as usize];
            chunk[..ids.len()].copy_from_slice(ids);
            self.store.chunk_put(base + c as u32, &chunk)?;
        }
        Ok(())
    }

    /// `vip`'s table `side` as the kernel holds it (a walk of the table).
    pub fn read_table(&self, vip: VipId, side: Side) -> Result<Vec<BackendId>, DataplaneError> {
        let chunks = table_chunks(&self.caps);
        let base = table_number(vip, side) * chunks;
        let mut table = Vec::with_capacity((chunks * MAGLEV_LANES) as usize);
        for c in 0..chunks {
            table.extend_from_slice(&self.store.chunk_get(base + c)?);
        }
        table.truncate(self.caps.table_size as usize);
        Ok(table)
    }

    /// The table `addr`'s packets are balanced with right now, if it is a VIP.
    pub fn live_table(&self, addr: &VipAddr) -> Result<Option<Vec<BackendId>>, DataplaneError> {
        let entry = self.vips()?.into_iter().flatten().find(|(a, _)| a == addr).map(|(_, e)| e);
        entry.map(|e| self.read_table(e.id, e.live)).transpose()
    }

    /// Entries per backend id in `vip`'s live table.
    pub fn table_fill(&self, vip: &VipEntry) -> Result<BTreeMap<BackendId, u32>, DataplaneError> {
        let mut fill = BTreeMap::new();
        for id in self.read_table(vip.id, vip.live)? {
            *fill.entry(id).or_default() += 1;
        }
        Ok(fill)
    }

    pub fn reset_stats(&mut self, of: StatsOf, id: u32) -> Result<(), DataplaneError> {
        self.store.stats_reset(of, id)
    }

    /// Writes word `word` of the filter from `keys`.
    fn write_filter_word(&mut self, keys: &BTreeSet<VipKey>, word: u32) -> Result<(), DataplaneError> {
        let bits = keys
            .iter()
            .map(|k| vip_filter_bit(&k.addr, k.family))
            .filter(|bit| bit / 64 == word)
            .fold(0u64, |w, bit| w | 1 << (bit % 64));
        self.store.filter_put(word, bits)
    }

    /// Adds (`present`) or removes `key` in the filter.
    fn update_filter(&mut self, key: &VipKey, present: bool) -> Result<(), DataplaneError> {
        let mut keys = match self.filtered.take() {
            Some(keys) => keys,
            None => {
                // First write, or after a failed one: rewrite every word.
                let keys: BTreeSet<VipKey> = self.store.vip_entries()?.into_iter().map(|(k, _)| k).collect();
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Previous;
    use crate::{
        dataplane::store::MemoryStore,
        model::{Forward, Protocol},
    };

    const CAPS: Capacities =
        Capacities { table_size: 13, max_vips: 4, max_backends: 16, conntrack_size: 1024 };

    fn vip(last: u8) -> VipAddr {
        VipAddr { ip: [192, 0, 2, last].into(), port: 80, protocol: Protocol::Tcp }
    }

    fn bit(addr: &VipAddr) -> (u32, u64) {
        let key = VipKey::from(addr);
        let bit = vip_filter_bit(&key.addr, key.family);
        (bit / 64, 1 << (bit % 64))
    }

    #[test]
    fn the_filter_follows_the_vips_and_bits_precede_entries() {
        let mut maps = Maps::new(MemoryStore::default(), CAPS);
        maps.store_mut().log_writes = true;
        let entry =
            VipEntry { id: 0, live: Side::First, forward: Forward::Dr, previous: Previous::Forgotten };
        maps.put_vip(&vip(1), &entry).unwrap();
        let writes = &maps.store().writes;
        assert_eq!(writes.last(), Some(&lb_common::maps::VIPS), "the entry after its bit: {writes:?}");
        let (word, mask) = bit(&vip(1));
        assert_ne!(maps.store().filter[&word] & mask, 0);
        assert_eq!(maps.store().filter.len() as u32, VIP_FILTER_WORDS, "first write: every word");

        maps.store_mut().writes.clear();
        maps.delete_vip(&vip(1)).unwrap();
        assert_eq!(maps.store().writes[0], lb_common::maps::VIPS, "the bit after its entry");
        assert_eq!(maps.store().filter[&word] & mask, 0);

        // A failed filter write: the next one rebuilds every word from VIPS.
        maps.put_vip(&vip(2), &entry).unwrap();
        maps.store_mut().fail_next_write = true;
        assert!(maps.put_vip(&vip(3), &entry).is_err());
        maps.store_mut().filter.clear();
        maps.put_vip(&vip(3), &entry).unwrap();
        for v in [vip(2), vip(3)] {
            let (word, mask) = bit(&v);
            assert_ne!(maps.store().filter[&word] & mask, 0, "{v}");
        }
    }

    #[test]
    fn tables_pack_into_chunks_and_rewrite_only_differences() {
        let mut maps = Maps::new(MemoryStore::default(), CAPS);
        let table: Vec<BackendId> = (1..=13).collect();
        maps.write_table(2, Side::Second, &table, None).unwrap();
        assert_eq!(maps.store().chunk_writes, 4, "13 ids in chunks of {MAGLEV_LANES}");
        let first = table_number(2, Side::Second) * table_chunks(&CAPS);
        assert_eq!(maps.store().chunks[&(first + 3)], [13, 0, 0, 0], "the last chunk padded with no backend");
        assert_eq!(maps.read_table(2, Side::Second).unwrap(), table);
        let mut changed = table.clone();
        changed[5] = 1;
        maps.write_table(2, Side::Second, &changed, Some(&table)).unwrap();
        assert_eq!(maps.store().chunk_writes, 5, "one chunk differs");
        assert_eq!(maps.read_table(2, Side::Second).unwrap(), changed);
        assert!(maps.read_table(2, Side::First).unwrap().iter().all(|id| *id == NO_BACKEND));
    }

    #[test]
    fn strays_and_undecodable_vip_entries_are_deleted() {
        let mut maps = Maps::new(MemoryStore::default(), CAPS);
        let entry =
            VipEntry { id: 0, live: Side::First, forward: Forward::Dr, previous: Previous::Forgotten };
        maps.put_vip(&vip(1), &entry).unwrap();
        maps.put_vip(&vip(2), &entry).unwrap();
        let garbage = VipKey { proto: 99, family: 4, ..VipKey::default() };
        maps.store_mut().vips.insert(garbage, VipInfo::default());
        maps.delete_vips_except(|a| *a == vip(1)).unwrap();
        let left: Vec<VipAddr> = maps.vips().unwrap().into_iter().map(|d| d.unwrap().0).collect();
        assert_eq!(left, [vip(1)]);
    }
}

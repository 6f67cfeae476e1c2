//! The connection table from userspace: `CONNTRACK` mapped into the
//! daemon's memory for each read (the data plane creates it mappable), so
//! counting its records reads memory instead of making a syscall per set,
//! and the table's pages count in the daemon's memory only while it reads.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    ptr::NonNull,
};

use aya::maps::{Array, IterableMap as _, MapData};
use lb_common::{
    CONN_WAYS, ConnEntry, ConnSet, ConnSlot, FlowKey, LAYOUT_VERSION, Meta, conn_set_index, conn_set_index2,
    flow_hash, maps,
};

use super::{
    kernel::{pinned, typed},
    store::{DataplaneError, map_err},
};

/// The table's map, its size in sets and its seed.
pub struct ConnTable {
    array: Array<MapData, ConnSet>,
    sets: u32,
    seed: u32,
}

/// One mapping of the whole table, unmapped on drop.
struct Mapping {
    base: NonNull<ConnSet>,
    sets: u32,
}

impl ConnTable {
    /// The table behind `array`, whose sets the data plane picks with `seed`.
    pub fn new(array: Array<MapData, ConnSet>, seed: u32) -> Self {
        ConnTable { sets: array.len(), array, seed }
    }

    /// The table pinned under `dir`, with the seed its `META` records;
    /// refused if `META` is of another layout (its seed would be misread).
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        let mut get = pinned(dir);
        let meta: Array<MapData, Meta> = typed(&mut get, maps::META)?;
        let meta = meta.get(&0, 0).map_err(map_err(maps::META, "read"))?;
        if meta.layout != LAYOUT_VERSION {
            return Err(DataplaneError::Layout {
                dir: dir.to_owned(),
                found: meta.layout,
                wanted: LAYOUT_VERSION,
            });
        }
        Ok(Self::new(typed(&mut get, maps::CONNTRACK)?, meta.conntrack_seed))
    }

    fn mapping(&self, prot: libc::c_int) -> Result<Mapping, DataplaneError> {
        let len = self.sets as usize * size_of::<ConnSet>();
        // SAFETY: a fresh shared mapping of a map descriptor; the kernel checks
        // the length against the array's size.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.array.map().fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap {
                map: maps::CONNTRACK,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(addr.cast()).expect("mmap does not return null on success");
        Ok(Mapping { base, sets: self.sets })
    }

    /// Slots holding a flow's record.
    pub fn entries(&self) -> Result<usize, DataplaneError> {
        let m = self.mapping(libc::PROT_READ)?;
        Ok((0..self.sets)
            .flat_map(|set| (0..CONN_WAYS).map(move |way| (set, way)))
            .filter(|&(set, way)| !m.slot(set, way).is_free())
            .count())
    }

    /// The sealed record of `flow`, if the table holds one, searched as the
    /// data plane does: its first set up to a free slot, then its second.
    pub fn get(&self, flow: &FlowKey) -> Result<Option<ConnEntry>, DataplaneError> {
        let m = self.mapping(libc::PROT_READ)?;
        let hash = flow_hash(flow);
        for set in [conn_set_index(hash, self.seed, self.sets), conn_set_index2(hash, self.seed, self.sets)] {
            for way in 0..CONN_WAYS {
                let slot = m.slot(set, way);
                if slot.holds(flow) {
                    return Ok(slot.sealed_entry(hash));
                }
                if slot.is_free() {
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// Forgets every record; returns how many there were. For tests: a
    /// CPU recording a flow meanwhile may leave a record after a free slot,
    /// where no search finds it until the flow is recorded again.
    pub fn clear(&self) -> Result<usize, DataplaneError> {
        let held = self.entries()?;
        let m = self.mapping(libc::PROT_READ | libc::PROT_WRITE)?;
        for set in 0..self.sets {
            // SAFETY: `set` is below the mapped count; volatile, as in `slot`.
            unsafe { m.base.as_ptr().add(set as usize).write_volatile(ConnSet::default()) }
        }
        Ok(held)
    }

    /// Writes a record of `flow` with `seal` as given into the first slot
    /// of its first set that holds it or is free (the set's first slot if
    /// neither). For tests: a seal that does not match `entry` is a slot
    /// another CPU was caught writing.
    pub fn plant(&self, flow: &FlowKey, entry: ConnEntry, seal: u64) -> Result<(), DataplaneError> {
        let m = self.mapping(libc::PROT_READ | libc::PROT_WRITE)?;
        let set = conn_set_index(flow_hash(flow), self.seed, self.sets);
        let way = (0..CONN_WAYS)
            .find(|&way| {
                let slot = m.slot(set, way);
                slot.holds(flow) || slot.is_free()
            })
            .unwrap_or(0);
        m.put(set, way, ConnSlot { key: *flow, entry, seal, ..ConnSlot::default() });
        Ok(())
    }
}

impl Mapping {
    /// Writes one slot whole (volatile, as in `slot`).
    fn put(&self, set: u32, way: usize, slot: ConnSlot) {
        assert!(set < self.sets && way < CONN_WAYS);
        // SAFETY: in bounds (checked above), mapped writable by the caller.
        unsafe {
            std::ptr::addr_of_mut!((*self.base.as_ptr().add(set as usize)).slots[way]).write_volatile(slot)
        }
    }

    /// A copy of one slot, as the data plane left it.
    fn slot(&self, set: u32, way: usize) -> ConnSlot {
        assert!(set < self.sets && way < CONN_WAYS);
        // SAFETY: in bounds (checked above); volatile because the kernel
        // writes the memory behind the compiler's back.
        unsafe { std::ptr::addr_of!((*self.base.as_ptr().add(set as usize)).slots[way]).read_volatile() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `ConnTable::mapping`, of this length,
        // used by nothing else.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.sets as usize * size_of::<ConnSet>()) };
    }
}

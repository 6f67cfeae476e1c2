//! The connection table from userspace: `CONNTRACK` mapped into the
//! daemon's memory (the data plane creates it mappable), so counting its
//! records reads memory instead of making a syscall per set.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    ptr::NonNull,
};

use aya::maps::{Array, IterableMap as _, Map, MapData};
use lb_common::{ConnEntry, ConnSet, ConnSlot, FlowKey, conn_set_index, conn_set_index2, flow_hash, maps};

use super::store::{DataplaneError, map_err};

/// A read-write mapping of the whole table, unmapped on drop.
pub struct ConnTable {
    base: NonNull<ConnSet>,
    sets: u32,
}

// SAFETY: the mapping is shared memory the kernel also writes; every access
// is a volatile copy of plain data, so handing it to another thread is sound.
unsafe impl Send for ConnTable {}
unsafe impl Sync for ConnTable {}

impl ConnTable {
    /// Maps the table behind `array`.
    pub fn map(array: &Array<MapData, ConnSet>) -> Result<Self, DataplaneError> {
        let sets = array.len();
        let len = sets as usize * size_of::<ConnSet>();
        let fd = array.map().fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of a map descriptor; the kernel checks
        // the length against the array's size.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if addr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap {
                map: maps::CONNTRACK,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(addr.cast()).expect("mmap does not return null on success");
        Ok(ConnTable { base, sets })
    }

    /// Maps the table pinned at `path`.
    pub fn from_pin(path: &Path) -> Result<Self, DataplaneError> {
        let data = MapData::from_pin(path)
            .map_err(|source| DataplaneError::Pinned { path: path.to_path_buf(), source })?;
        let array =
            Map::from_map_data(data).and_then(Array::try_from).map_err(map_err(maps::CONNTRACK, "open"))?;
        Self::map(&array)
    }

    /// A copy of one slot, as the data plane left it.
    fn slot(&self, set: u32, way: usize) -> ConnSlot {
        debug_assert!(set < self.sets);
        // SAFETY: `set` is below the mapped count; volatile because the kernel
        // writes the memory behind the compiler's back.
        unsafe { std::ptr::addr_of!((*self.base.as_ptr().add(set as usize)).slots[way]).read_volatile() }
    }

    fn slots(&self) -> impl Iterator<Item = (u32, usize)> + '_ {
        (0..self.sets).flat_map(|set| (0..lb_common::CONN_WAYS).map(move |way| (set, way)))
    }

    /// Slots holding a flow's record.
    pub fn entries(&self) -> usize {
        self.slots().filter(|&(set, way)| !self.slot(set, way).is_free()).count()
    }

    /// The sealed record of `flow`, if the table holds one (in either of
    /// its sets).
    pub fn get(&self, flow: &FlowKey) -> Option<ConnEntry> {
        let hash = flow_hash(flow);
        [conn_set_index(hash, self.sets), conn_set_index2(hash, self.sets)]
            .into_iter()
            .flat_map(|set| (0..lb_common::CONN_WAYS).map(move |way| (set, way)))
            .map(|(set, way)| self.slot(set, way))
            .find(|s| s.holds(flow))?
            .sealed_entry(hash)
    }

    /// Forgets every record (tests, a flow table to start over); returns
    /// how many there were. A flow recorded in its second set whose first
    /// set is emptied before it is not found until it is recorded again.
    pub fn clear(&self) -> usize {
        let held = self.entries();
        for set in 0..self.sets {
            // SAFETY: as in `slot`; a record being written meanwhile may survive.
            unsafe { self.base.as_ptr().add(set as usize).write_volatile(ConnSet::default()) }
        }
        held
    }
}

impl Drop for ConnTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this length, used by nothing else.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.sets as usize * size_of::<ConnSet>()) };
    }
}

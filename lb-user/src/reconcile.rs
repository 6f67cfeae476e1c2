//! Desired state → kernel maps.
//!
//! The reconciler's memory is the single source of truth; the maps are a
//! projection of it. A changed VIP gets its new Maglev table written into
//! the slot packets are not using, then one write of the VIP entry switches
//! to it, so no packet ever sees a half-written table. Backend ids freed by
//! a change are reused last (FIFO), so a packet still holding the old table
//! cannot reach a backend that took over a just-freed id.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
};

use lb_common::{BackendId, BackendInfo, MAGLEV_LANES, MaglevChunk, NO_BACKEND, VipInfo, VipKey};
use tracing::{info, warn};

use crate::{
    addr,
    dataplane::{DataplaneError, Geometry, MapReader, MapWriter},
    maglev,
};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("no free {what} id: all {max} are in use (raise {setting} and restart)")]
    Capacity {
        what: &'static str,
        max: u32,
        setting: &'static str,
    },
}

/// A VIP as configuration or discovery wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVip {
    pub name: String,
    pub key: VipKey,
    pub mode: u8,
    pub backends: Vec<DesiredBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: IpAddr,
    pub weight: u32,
    /// Next-hop MAC; a backend without one stays out of the table.
    pub mac: Option<[u8; 6]>,
}

#[derive(Clone, Debug)]
pub struct VipState {
    pub name: String,
    pub id: u32,
    pub mode: u8,
    /// Which of the VIP's two tables packets use.
    live: u32,
    /// What the kernel holds in each table; `None` when unknown.
    tables: [Option<Vec<BackendId>>; 2],
    pub backends: BTreeMap<IpAddr, BackendState>,
}

impl VipState {
    /// The table packets are balanced with, as written to the kernel.
    pub fn live_table(&self) -> Option<&[BackendId]> {
        self.tables[self.live as usize].as_deref()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendState {
    pub id: BackendId,
    pub weight: u32,
    pub mac: Option<[u8; 6]>,
    /// Table entries this backend holds in the live table.
    pub slots: u32,
    /// Whether `BACKENDS[id]` is known to hold this address and MAC.
    written: bool,
    /// False after adoption: pinned maps do not record weights.
    weight_known: bool,
}

/// Free ids, handed out oldest-freed first.
#[derive(Debug)]
struct IdPool {
    free: VecDeque<u32>,
}

impl IdPool {
    fn new(ids: std::ops::Range<u32>) -> Self {
        Self { free: ids.collect() }
    }
    fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }
    fn reserve(&mut self, id: u32) -> bool {
        let found = self.free.iter().position(|&f| f == id);
        found.map(|i| self.free.remove(i)).is_some()
    }
    fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

#[derive(Debug)]
pub struct Reconciler {
    geometry: Geometry,
    vips: BTreeMap<VipKey, VipState>,
    vip_ids: IdPool,
    backend_ids: IdPool,
    /// A write failed: the maps' contents are unknown, rewrite everything.
    resync: bool,
}

impl Reconciler {
    pub fn new(geometry: Geometry) -> Self {
        Self {
            geometry,
            vips: BTreeMap::new(),
            vip_ids: IdPool::new(0..geometry.max_vips),
            backend_ids: IdPool::new(1..geometry.max_backends),
            resync: false,
        }
    }

    /// Starts from what pinned maps hold, so a restarted daemon keeps every
    /// VIP's id, live table and backend ids: the next `apply` then changes
    /// only what differs. Entries that do not add up are left for `apply`
    /// to replace.
    pub fn adopt(geometry: Geometry, maps: &impl MapReader) -> Result<Self, ReconcileError> {
        let mut r = Self::new(geometry);
        let chunks = geometry.table_chunks();
        for (key, vip) in maps.vips()? {
            let live = vip.table.wrapping_sub(vip.id * 2);
            if live > 1 || !r.vip_ids.reserve(vip.id) {
                warn!(vip = %describe(&key), "pinned VIP entry is inconsistent; it will be rebuilt");
                continue;
            }
            let mut table = Vec::with_capacity(geometry.table_size as usize);
            for c in 0..chunks {
                table.extend_from_slice(&maps.chunk(vip.table * chunks + c)?);
            }
            table.truncate(geometry.table_size as usize);
            let mut backends = BTreeMap::new();
            for &id in table.iter().collect::<BTreeSet<_>>() {
                if id == NO_BACKEND {
                    continue;
                }
                let info = maps.backend(id)?;
                let addr = addr::from_bytes(info.addr, info.family);
                match addr {
                    Some(addr) if r.backend_ids.reserve(id as u32) => {
                        let state = BackendState {
                            id,
                            weight: 0,
                            mac: Some(info.mac),
                            slots: table.iter().filter(|&&t| t == id).count() as u32,
                            written: true,
                            weight_known: false,
                        };
                        backends.insert(addr, state);
                    }
                    _ => warn!(vip = %describe(&key), id, "pinned backend entry is inconsistent"),
                }
            }
            let mut tables = [None, None];
            tables[live as usize] = Some(table);
            r.vips.insert(
                key,
                VipState {
                    name: String::new(),
                    id: vip.id,
                    mode: vip.mode,
                    live,
                    tables,
                    backends,
                },
            );
        }
        Ok(r)
    }

    pub fn vips(&self) -> &BTreeMap<VipKey, VipState> {
        &self.vips
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Makes the maps match `desired`. On error the next call rewrites
    /// everything, whatever failed half-way.
    pub fn apply(&mut self, desired: &[DesiredVip], maps: &mut impl MapWriter) -> Result<(), ReconcileError> {
        if std::mem::take(&mut self.resync) {
            for vip in self.vips.values_mut() {
                vip.tables = [None, None];
                vip.backends.values_mut().for_each(|b| b.written = false);
            }
        }
        let result = self.apply_all(desired, maps);
        self.resync = result.is_err();
        result
    }

    fn apply_all(&mut self, desired: &[DesiredVip], maps: &mut impl MapWriter) -> Result<(), ReconcileError> {
        let wanted: BTreeSet<VipKey> = desired.iter().map(|v| v.key).collect();
        let gone: Vec<VipKey> = self
            .vips
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            maps.delete_vip(&key)?;
            if let Some(vip) = self.vips.remove(&key) {
                info!(vip = %vip.name, address = %describe(&key), "VIP removed");
                self.vip_ids.release(vip.id);
                vip.backends
                    .values()
                    .for_each(|b| self.backend_ids.release(b.id as u32));
            }
        }
        for key in maps.vip_keys()? {
            if !self.vips.contains_key(&key) && !wanted.contains(&key) {
                maps.delete_vip(&key)?;
            }
        }
        for vip in desired {
            self.apply_vip(vip, maps)?;
        }
        Ok(())
    }

    fn apply_vip(&mut self, want: &DesiredVip, maps: &mut impl MapWriter) -> Result<(), ReconcileError> {
        if !self.vips.contains_key(&want.key) {
            let id = self.vip_ids.take().ok_or(ReconcileError::Capacity {
                what: "VIP",
                max: self.geometry.max_vips,
                setting: "max_vips",
            })?;
            maps.reset_vip_stats(id)?;
            info!(vip = %want.name, address = %describe(&want.key), "VIP added");
            let state = VipState {
                name: want.name.clone(),
                id,
                mode: want.mode,
                live: 1,
                tables: [None, None],
                backends: BTreeMap::new(),
            };
            self.vips.insert(want.key, state);
        }
        let vip = self.vips.get_mut(&want.key).expect("inserted above");
        vip.name.clone_from(&want.name);

        let wanted: BTreeSet<IpAddr> = want.backends.iter().map(|b| b.addr).collect();
        let leaving: Vec<IpAddr> = vip
            .backends
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for b in &want.backends {
            let state = match vip.backends.get_mut(&b.addr) {
                Some(state) => state,
                None => {
                    let id = self.backend_ids.take().ok_or(ReconcileError::Capacity {
                        what: "backend",
                        max: self.geometry.max_backends - 1,
                        setting: "max_backends",
                    })? as BackendId;
                    maps.reset_backend_stats(id)?;
                    info!(vip = %vip.name, backend = %b.addr, weight = b.weight, "backend added");
                    let state = BackendState {
                        id,
                        weight: b.weight,
                        mac: b.mac,
                        slots: 0,
                        written: false,
                        weight_known: true,
                    };
                    vip.backends.entry(b.addr).or_insert(state)
                }
            };
            if state.weight != b.weight {
                if state.weight_known {
                    info!(vip = %vip.name, backend = %b.addr, from = state.weight, to = b.weight, "backend weight changed");
                }
                state.weight = b.weight;
            }
            state.weight_known = true;
            if state.mac != b.mac {
                match b.mac {
                    Some(mac) => {
                        info!(vip = %vip.name, backend = %b.addr, mac = %addr::format_mac(&mac), "backend MAC resolved")
                    }
                    None => {
                        warn!(vip = %vip.name, backend = %b.addr, "backend MAC unresolved: out of the table until it resolves")
                    }
                }
                state.mac = b.mac;
                state.written = false;
            }
            if !state.written {
                let (bytes, family) = addr::to_bytes(b.addr);
                let info = BackendInfo {
                    addr: bytes,
                    mac: state.mac.unwrap_or_default(),
                    family,
                    _pad: 0,
                };
                maps.put_backend(state.id, &info)?;
                state.written = true;
            }
        }

        let names: Vec<(String, BackendId, u32)> = vip
            .backends
            .iter()
            .filter(|(a, b)| wanted.contains(a) && b.mac.is_some())
            .map(|(a, b)| (a.to_string(), b.id, b.weight))
            .collect();
        let entries: Vec<maglev::Entry<'_>> = names
            .iter()
            .map(|(identity, id, weight)| maglev::Entry {
                identity,
                id: *id,
                weight: *weight,
            })
            .collect();
        let table = maglev::build(&entries, self.geometry.table_size);

        let unchanged = vip.mode == want.mode && vip.tables[vip.live as usize].as_ref() == Some(&table);
        if !unchanged {
            let target = 1 - vip.live;
            let previous = vip.tables[target as usize].take();
            write_table(
                maps,
                &self.geometry,
                vip.id * 2 + target,
                &table,
                previous.as_deref(),
            )?;
            let info = VipInfo {
                id: vip.id,
                table: vip.id * 2 + target,
                mode: want.mode,
                _pad: [0; 3],
            };
            maps.put_vip(&want.key, &info)?;
            vip.tables[target as usize] = Some(table);
            vip.live = target;
            vip.mode = want.mode;
        }
        for state in vip.backends.values_mut() {
            state.slots = 0;
        }
        if let Some(live) = &vip.tables[vip.live as usize] {
            let mut by_id: BTreeMap<BackendId, u32> = BTreeMap::new();
            live.iter().for_each(|id| *by_id.entry(*id).or_default() += 1);
            for state in vip.backends.values_mut() {
                state.slots = by_id.get(&state.id).copied().unwrap_or(0);
            }
        }
        // Only now that no table refers to them may leaving backends' ids go.
        for a in leaving {
            if let Some(state) = vip.backends.remove(&a) {
                info!(vip = %vip.name, backend = %a, "backend removed");
                self.backend_ids.release(state.id as u32);
            }
        }
        Ok(())
    }
}

/// Writes `table` as table number `index`, skipping chunks that already
/// hold the right ids.
fn write_table(
    maps: &mut impl MapWriter,
    geometry: &Geometry,
    index: u32,
    table: &[BackendId],
    previous: Option<&[BackendId]>,
) -> Result<(), DataplaneError> {
    let lanes = MAGLEV_LANES as usize;
    let base = index * geometry.table_chunks();
    for (c, ids) in table.chunks(lanes).enumerate() {
        if previous.is_some_and(|p| p.get(c * lanes..c * lanes + ids.len()) == Some(ids)) {
            continue;
        }
        let mut chunk: MaglevChunk = [NO_BACKEND; MAGLEV_LANES as usize];
        chunk[..ids.len()].copy_from_slice(ids);
        maps.put_chunk(base + c as u32, &chunk)?;
    }
    Ok(())
}

/// "tcp 192.0.2.10:80" for logs.
pub fn describe(key: &VipKey) -> String {
    let proto = match key.proto {
        lb_common::PROTO_TCP => "tcp",
        lb_common::PROTO_UDP => "udp",
        _ => "?",
    };
    let port = u16::from_be(key.port_be);
    match addr::from_bytes(key.addr, key.family) {
        Some(IpAddr::V6(a)) => format!("{proto} [{a}]:{port}"),
        Some(a) => format!("{proto} {a}:{port}"),
        None => format!("{proto} ?:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{MODE_DR, PROTO_TCP};

    use super::*;
    use crate::dataplane::MemoryMaps;

    const G: Geometry = Geometry {
        table_size: 251,
        max_vips: 4,
        max_backends: 16,
    };

    fn vip(name: &str, last: u8, backends: &[(u8, u32)]) -> DesiredVip {
        DesiredVip {
            name: name.into(),
            key: addr::vip_key(IpAddr::from([192, 0, 2, last]), 80, PROTO_TCP),
            mode: MODE_DR,
            backends: backends
                .iter()
                .map(|&(b, weight)| DesiredBackend {
                    addr: IpAddr::from([10, 0, 0, b]),
                    weight,
                    mac: Some([2, 0, 0, 0, 0, b]),
                })
                .collect(),
        }
    }

    /// The backend addresses each live table entry points to, per VIP.
    fn live(maps: &MemoryMaps) -> BTreeMap<VipKey, Vec<IpAddr>> {
        maps.vips
            .keys()
            .map(|k| {
                let table = maps.live_table(k, &G).unwrap();
                let addrs = table
                    .iter()
                    .map(|id| {
                        let b = maps.backends[id];
                        addr::from_bytes(b.addr, b.family).unwrap()
                    })
                    .collect();
                (*k, addrs)
            })
            .collect()
    }

    fn expected(v: &DesiredVip) -> Vec<IpAddr> {
        let names: Vec<String> = v.backends.iter().map(|b| b.addr.to_string()).collect();
        let entries: Vec<maglev::Entry<'_>> = v
            .backends
            .iter()
            .zip(&names)
            .enumerate()
            .map(|(i, (b, n))| maglev::Entry {
                identity: n,
                id: i as BackendId + 1,
                weight: b.weight,
            })
            .collect();
        maglev::build(&entries, G.table_size)
            .iter()
            .map(|id| v.backends[*id as usize - 1].addr)
            .collect()
    }

    #[test]
    fn tables_match_the_desired_backends_and_unchanged_input_writes_nothing() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let want = [vip("a", 1, &[(1, 1), (2, 1), (3, 2)]), vip("b", 2, &[(4, 1)])];
        r.apply(&want, &mut maps).unwrap();
        let tables = live(&maps);
        for v in &want {
            assert_eq!(tables[&v.key], expected(v), "VIP {}", v.name);
        }
        let writes = maps.chunk_writes;
        r.apply(&want, &mut maps).unwrap();
        assert_eq!(maps.chunk_writes, writes, "nothing changed, nothing written");
    }

    #[test]
    fn a_change_goes_to_the_other_table_then_flips() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        r.apply(&[vip("a", 1, &[(1, 1), (2, 1), (3, 1)])], &mut maps)
            .unwrap();
        let key = vip("a", 1, &[]).key;
        let first = maps.vips[&key];
        let changed = vip("a", 1, &[(1, 1), (2, 1), (3, 2)]);
        r.apply(std::slice::from_ref(&changed), &mut maps).unwrap();
        let second = maps.vips[&key];
        assert_eq!(first.id, second.id);
        assert_ne!(first.table, second.table, "the new table is the other one");
        assert_eq!(live(&maps)[&key], expected(&changed));
        // Back again: the first table is rewritten only where it differs.
        let before = maps.chunk_writes;
        r.apply(&[vip("a", 1, &[(1, 1), (2, 1), (3, 1)])], &mut maps)
            .unwrap();
        assert_eq!(maps.vips[&key].table, first.table);
        assert!(
            maps.chunk_writes - before < G.table_chunks() as usize / 2,
            "diff, not a full rewrite"
        );
    }

    #[test]
    fn a_failed_write_is_followed_by_a_full_resync() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        r.apply(&[vip("a", 1, &[(1, 1), (2, 1)])], &mut maps).unwrap();
        let want = [vip("a", 1, &[(1, 1), (3, 1)])];
        maps.fail_next_write = true;
        assert!(r.apply(&want, &mut maps).is_err());
        // Meanwhile someone scribbles over the maps.
        maps.chunks.values_mut().for_each(|c| *c = [0; 4]);
        r.apply(&want, &mut maps).unwrap();
        assert_eq!(live(&maps)[&want[0].key], expected(&want[0]));
    }

    #[test]
    fn removed_vips_leave_the_maps_and_ids_are_reused_last() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        r.apply(&[vip("a", 1, &[(1, 1)]), vip("b", 2, &[(2, 1)])], &mut maps)
            .unwrap();
        let a_backend = r.vips()[&vip("a", 1, &[]).key]
            .backends
            .values()
            .next()
            .unwrap()
            .id;
        r.apply(&[vip("b", 2, &[(2, 1)])], &mut maps).unwrap();
        assert_eq!(maps.vips.len(), 1);
        r.apply(&[vip("b", 2, &[(2, 1)]), vip("c", 3, &[(5, 1)])], &mut maps)
            .unwrap();
        let c_backend = r.vips()[&vip("c", 3, &[]).key]
            .backends
            .values()
            .next()
            .unwrap()
            .id;
        assert_ne!(c_backend, a_backend, "a just-freed id is not handed out first");
        // A stray entry (not ours, not wanted) is removed too.
        maps.vips.insert(vip("x", 9, &[]).key, VipInfo::default());
        r.apply(&[vip("b", 2, &[(2, 1)])], &mut maps).unwrap();
        assert_eq!(
            maps.vips.keys().copied().collect::<Vec<_>>(),
            vec![vip("b", 2, &[]).key]
        );
    }

    #[test]
    fn adopting_pinned_state_keeps_ids_and_tables() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let want = [vip("a", 1, &[(1, 1), (2, 3)]), vip("b", 2, &[(3, 1)])];
        r.apply(&want, &mut maps).unwrap();
        let ids: Vec<(u32, u32)> = maps.vips.values().map(|v| (v.id, v.table)).collect();
        let writes = maps.chunk_writes;

        let mut adopted = Reconciler::adopt(G, &maps).unwrap();
        adopted.apply(&want, &mut maps).unwrap();
        assert_eq!(
            maps.chunk_writes, writes,
            "restart with the same config writes no table"
        );
        assert_eq!(
            maps.vips.values().map(|v| (v.id, v.table)).collect::<Vec<_>>(),
            ids
        );
        assert_eq!(adopted.vips()[&want[0].key].name, "a");
    }

    #[test]
    fn capacity_is_enforced_with_a_clear_error() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(Geometry {
            table_size: 251,
            max_vips: 1,
            max_backends: 3,
        });
        let err = r
            .apply(&[vip("a", 1, &[]), vip("b", 2, &[])], &mut maps)
            .unwrap_err();
        assert!(err.to_string().contains("max_vips"), "{err}");
        let mut r = Reconciler::new(Geometry {
            table_size: 251,
            max_vips: 1,
            max_backends: 3,
        });
        let err = r
            .apply(&[vip("a", 1, &[(1, 1), (2, 1), (3, 1)])], &mut maps)
            .unwrap_err();
        assert!(err.to_string().contains("max_backends"), "{err}");
    }

    #[test]
    fn unresolved_backends_stay_out_of_the_table() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let mut want = vip("a", 1, &[(1, 1), (2, 1)]);
        want.backends[1].mac = None;
        r.apply(std::slice::from_ref(&want), &mut maps).unwrap();
        assert!(
            live(&maps)[&want.key]
                .iter()
                .all(|a| *a == IpAddr::from([10, 0, 0, 1]))
        );
        want.backends[1].mac = Some([2, 0, 0, 0, 0, 2]);
        r.apply(std::slice::from_ref(&want), &mut maps).unwrap();
        assert_eq!(live(&maps)[&want.key], expected(&want));
    }
}

//! Desired state → kernel maps.
//!
//! The reconciler's memory is the single source of truth; the maps are a
//! projection of it. A changed VIP gets its new Maglev table written into
//! the slot packets are not using, then one write of the VIP entry switches
//! to it, so no packet ever sees a half-written table.
//!
//! Backends leave gently. Weight 0 drains a backend: no new flows, but
//! flows the connection table recorded for it stay. A backend removed from
//! the desired state drains for `drain_timeout`, then its id is freed and
//! its recorded flows are rebalanced. Freed ids are handed out again last
//! (FIFO) and with a new generation, so neither a packet holding an old
//! table nor an old connection entry can reach the id's next owner.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_TUN, BackendId, BackendInfo, MAGLEV_LANES, MODE_TUN,
    MaglevChunk, NO_BACKEND, VipInfo, VipKey,
};
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
    Capacity { what: &'static str, max: u32, setting: &'static str },
}

/// What configuration or discovery wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub vips: Vec<DesiredVip>,
    /// How long a removed backend keeps its established flows.
    pub drain_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVip {
    pub name: String,
    pub key: VipKey,
    pub mode: u8,
    pub backends: Vec<DesiredBackend>,
    /// How backends missing from `backends` leave.
    pub leave: Leave,
    /// The backend list is not known yet (discovery has not answered): an
    /// existing VIP keeps what it has, a new one starts without backends.
    pub hold: bool,
}

/// How a backend that is no longer wanted leaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Leave {
    /// Drains for `Desired::drain_timeout` (it was removed on purpose).
    #[default]
    Drain,
    /// Goes at once and its flows rebalance (it failed its health check).
    AtOnce,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: IpAddr,
    /// 0 drains the backend.
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
    /// The Maglev inputs the live table is known to be built from; `None`
    /// when unknown (e.g. adopted: pinned maps do not record weights).
    built_from: Option<Vec<MaglevInput>>,
    pub backends: BTreeMap<IpAddr, BackendState>,
    /// Table switches since this daemon started, and when the last was.
    pub generation: u64,
    pub swapped_at: Option<SystemTime>,
}

/// One active backend as the table was built from it: address (its
/// identity), id and weight. The table size is fixed per reconciler.
type MaglevInput = (IpAddr, BackendId, u32);

impl VipState {
    /// The table packets are balanced with, as written to the kernel.
    pub fn live_table(&self) -> Option<&[BackendId]> {
        self.tables[self.live as usize].as_deref()
    }
}

/// Where a backend stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Wanted, with weight and MAC: in the table.
    Active,
    /// Wanted, but weight 0 or no MAC yet: out of the table; established
    /// flows stay.
    Idle,
    /// No longer wanted: out of the table until `until`, then freed.
    Leaving { until: Instant },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendState {
    pub id: BackendId,
    pub generation: u32,
    pub weight: u32,
    pub mac: Option<[u8; 6]>,
    pub role: Role,
    /// Table entries this backend holds in the live table.
    pub slots: u32,
    /// What `BACKENDS[id]` is known to hold; `None` when unknown.
    written: Option<BackendInfo>,
    /// False after adoption: pinned maps do not record weights.
    weight_known: bool,
}

impl BackendState {
    /// `BackendInfo::flags` under a VIP forwarding in `mode`. In DR a
    /// backend without a real MAC takes no flows: one leaving a TUN VIP
    /// that turns DR still has TUN's all-zero placeholder.
    fn flags(&self, mode: u8) -> u8 {
        let has_mac = match self.mac {
            Some(mac) => mode == MODE_TUN || mac != [0; 6],
            None => false,
        };
        let role = match self.role {
            _ if !has_mac => 0,
            Role::Active => BACKEND_ACTIVE,
            Role::Idle | Role::Leaving { .. } => BACKEND_DRAINING,
        };
        if role != 0 && mode == MODE_TUN { role | BACKEND_TUN } else { role }
    }
}

/// Free ids, handed out oldest-freed first so a freed id rests as long as
/// possible. Adoption cannot recover that order (the maps do not record
/// when an id was freed) and starts again from ascending ids; the
/// generation is what guarantees an old entry never reaches a new owner.
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
    next_generation: u32,
    /// A write failed: the maps' contents are unknown, rewrite everything.
    resync: bool,
    /// Pinned backend entries (id, generation) that take flows but could
    /// not be adopted: their ids stay reserved until the next `apply` has
    /// switched every table away from them and marked them unused, or
    /// their recorded flows would keep reaching them.
    orphans: Vec<(BackendId, u32)>,
    shortfalls: Vec<String>,
}

impl Reconciler {
    pub fn new(geometry: Geometry) -> Self {
        Self {
            geometry,
            vips: BTreeMap::new(),
            vip_ids: IdPool::new(0..geometry.max_vips),
            backend_ids: IdPool::new(1..geometry.max_backends),
            next_generation: 1,
            resync: false,
            orphans: Vec::new(),
            shortfalls: Vec::new(),
        }
    }

    /// Starts from what pinned maps hold, so a restarted daemon keeps every
    /// VIP's id and live table and every backend's id and generation: the
    /// next `apply` changes only what differs, and recorded connections stay
    /// valid. Entries that do not add up are left for `apply` to replace.
    pub fn adopt(geometry: Geometry, maps: &impl MapReader) -> Result<Self, ReconcileError> {
        let mut r = Self::new(geometry);
        let chunks = geometry.table_chunks();
        let mut by_id = BTreeMap::new();
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
            let mut tables = [None, None];
            tables[live as usize] = Some(table);
            let state = VipState {
                name: String::new(),
                id: vip.id,
                mode: vip.mode,
                live,
                tables,
                built_from: None,
                backends: BTreeMap::new(),
                generation: 0,
                swapped_at: None,
            };
            by_id.insert(vip.id, key);
            r.vips.insert(key, state);
        }
        for (id, info) in maps.backends()? {
            r.next_generation = r.next_generation.max(info.generation.wrapping_add(1));
            if info.flags == 0 {
                continue;
            }
            let vip = by_id.get(&info.vip_id).and_then(|k| r.vips.get_mut(k));
            let addr = addr::from_bytes(info.addr, info.family);
            // Ids outside the pool (0 is "no backend") are never recorded.
            if !r.backend_ids.reserve(id as u32) {
                continue;
            }
            let (Some(vip), Some(addr)) = (vip, addr) else {
                r.orphans.push((id, info.generation));
                continue;
            };
            if vip.backends.contains_key(&addr) {
                warn!(vip = %vip.name, id, "pinned backend entry is inconsistent");
                r.orphans.push((id, info.generation));
                continue;
            }
            let slots = vip.live_table().map_or(0, |t| t.iter().filter(|&&t| t == id).count() as u32);
            let role = if info.flags & BACKEND_ACTIVE != 0 { Role::Active } else { Role::Idle };
            let state = BackendState {
                id,
                generation: info.generation,
                weight: 0,
                mac: Some(info.mac),
                role,
                slots,
                written: Some(info),
                weight_known: false,
            };
            vip.backends.insert(addr, state);
        }
        // Every table entry must name an adopted backend, or the table is rebuilt.
        for vip in r.vips.values_mut() {
            let ids: BTreeSet<BackendId> = vip.backends.values().map(|b| b.id).collect();
            if let Some(t) = vip.live_table()
                && t.iter().any(|id| *id != NO_BACKEND && !ids.contains(id))
            {
                vip.tables = [None, None];
            }
        }
        Ok(r)
    }

    pub fn vips(&self) -> &BTreeMap<VipKey, VipState> {
        &self.vips
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// When the next leaving backend is due to be freed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.vips
            .values()
            .flat_map(|v| v.backends.values())
            .filter_map(|b| match b.role {
                Role::Leaving { until } => Some(until),
                _ => None,
            })
            .min()
    }

    /// Makes the maps match `desired` as of `now`. On error the next call
    /// rewrites everything, whatever failed half-way. Memory changes only
    /// after the writes it stands for succeeded, so it never claims more
    /// than the maps hold.
    pub fn apply(
        &mut self,
        desired: &Desired,
        now: Instant,
        maps: &mut impl MapWriter,
    ) -> Result<(), ReconcileError> {
        if std::mem::take(&mut self.resync) {
            for vip in self.vips.values_mut() {
                vip.tables = [None, None];
                vip.built_from = None;
                vip.backends.values_mut().for_each(|b| b.written = None);
            }
        }
        self.shortfalls.clear();
        let result = self.apply_all(desired, now, maps);
        self.resync = result.is_err();
        result
    }

    /// What is wanted but has no id left (VIPs or backends beyond the
    /// capacities), as of the last `apply`: left out, not an error.
    pub fn shortfalls(&self) -> &[String] {
        &self.shortfalls
    }

    fn apply_all(
        &mut self,
        desired: &Desired,
        now: Instant,
        maps: &mut impl MapWriter,
    ) -> Result<(), ReconcileError> {
        let wanted: BTreeSet<VipKey> = desired.vips.iter().map(|v| v.key).collect();
        let gone: Vec<VipKey> = self.vips.keys().filter(|k| !wanted.contains(k)).copied().collect();
        for key in gone {
            // Backends first: established flows skip the VIP lookup, so
            // the VIP entry alone does not stop them.
            for b in self.vips[&key].backends.values() {
                free_backend(maps, b)?;
            }
            maps.delete_vip(&key)?;
            let vip = self.vips.remove(&key).expect("present");
            info!(vip = %vip.name, address = %describe(&key), "VIP removed");
            self.vip_ids.release(vip.id);
            vip.backends.values().for_each(|b| self.backend_ids.release(b.id as u32));
        }
        for key in maps.vip_keys()? {
            if !self.vips.contains_key(&key) && !wanted.contains(&key) {
                maps.delete_vip(&key)?;
            }
        }
        for vip in &desired.vips {
            if vip.hold
                && let Some(state) = self.vips.get_mut(&vip.key)
            {
                state.name.clone_from(&vip.name);
                continue;
            }
            let drain = match vip.leave {
                Leave::Drain => desired.drain_timeout,
                Leave::AtOnce => Duration::ZERO,
            };
            self.apply_vip(vip, drain, now, maps)?;
        }
        while let Some(&(id, generation)) = self.orphans.last() {
            maps.put_backend(id, &BackendInfo { generation, ..BackendInfo::default() })?;
            self.orphans.pop();
            self.backend_ids.release(id as u32);
        }
        Ok(())
    }

    fn apply_vip(
        &mut self,
        want: &DesiredVip,
        drain_timeout: Duration,
        now: Instant,
        maps: &mut impl MapWriter,
    ) -> Result<(), ReconcileError> {
        if !self.vips.contains_key(&want.key) {
            let Some(id) = self.vip_ids.take() else {
                self.shortfalls.push(format!(
                    "VIP {} left out: all {} VIP ids are in use (raise max_vips and restart)",
                    want.name, self.geometry.max_vips
                ));
                return Ok(());
            };
            if let Err(e) = maps.reset_vip_stats(id) {
                self.vip_ids.release(id);
                return Err(e.into());
            }
            info!(vip = %want.name, address = %describe(&want.key), "VIP added");
            let state = VipState {
                name: want.name.clone(),
                id,
                mode: want.mode,
                live: 1,
                tables: [None, None],
                built_from: None,
                backends: BTreeMap::new(),
                generation: 0,
                swapped_at: None,
            };
            self.vips.insert(want.key, state);
        }
        let vip = self.vips.get_mut(&want.key).expect("inserted above");
        vip.name.clone_from(&want.name);

        // Roles first: who is wanted, who is leaving.
        let wanted: BTreeSet<IpAddr> = want.backends.iter().map(|b| b.addr).collect();
        for (addr, state) in vip.backends.iter_mut() {
            if !wanted.contains(addr) && !matches!(state.role, Role::Leaving { .. }) {
                if drain_timeout.is_zero() {
                    info!(vip = %vip.name, backend = %addr, "backend removed");
                } else {
                    info!(vip = %vip.name, backend = %addr, timeout = ?drain_timeout, "backend removed; draining");
                }
                state.role = Role::Leaving { until: now + drain_timeout };
            }
        }
        // Leavers whose time is up and whom no table names any more go
        // before new backends take ids: a full pool must not block a swap.
        free_expired(vip, now, maps, &mut self.backend_ids, |b| b.slots == 0)?;

        for b in &want.backends {
            let state = match vip.backends.get_mut(&b.addr) {
                Some(state) => state,
                None => {
                    let Some(id) = self.backend_ids.take() else {
                        self.shortfalls.push(format!(
                            "VIP {}: backend {} left out: all {} backend ids are in use (raise max_backends and restart)",
                            vip.name,
                            b.addr,
                            self.geometry.max_backends - 1
                        ));
                        continue;
                    };
                    let id = id as BackendId;
                    if let Err(e) = maps.reset_backend_stats(id) {
                        self.backend_ids.release(id as u32);
                        return Err(e.into());
                    }
                    info!(vip = %vip.name, backend = %b.addr, weight = b.weight, "backend added");
                    let state = BackendState {
                        id,
                        generation: self.next_generation,
                        weight: b.weight,
                        mac: b.mac,
                        role: Role::Idle,
                        slots: 0,
                        written: None,
                        weight_known: true,
                    };
                    self.next_generation = self.next_generation.wrapping_add(1);
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
            }
            let role = if b.weight > 0 && b.mac.is_some() { Role::Active } else { Role::Idle };
            if role != state.role {
                if matches!(state.role, Role::Leaving { .. }) {
                    info!(vip = %vip.name, backend = %b.addr, "backend back before its drain ended");
                } else if state.role == Role::Active && b.weight == 0 {
                    info!(vip = %vip.name, backend = %b.addr, "backend draining (weight 0)");
                }
                state.role = role;
            }
        }

        // Backends joining the table are written before a table names them;
        // those already in it only after the switch, so a flag change (say,
        // draining) comes with the table that drops them. Each entry carries
        // its mode and the MAC that mode needs, so it is consistent on its
        // own whichever side of the switch it is written. While the VIP is
        // TUN every entry goes first all the same: on a change to DR the
        // backends turn DR (with their MACs) no later than the table.
        let was_tun = vip.mode == MODE_TUN;
        for (addr, state) in vip.backends.iter_mut() {
            if state.role == Role::Active && (state.slots == 0 || state.written.is_none() || was_tun) {
                write_backend(maps, (vip.id, want.mode), *addr, state)?;
            }
        }

        let inputs: Vec<MaglevInput> = vip
            .backends
            .iter()
            .filter(|(_, b)| b.role == Role::Active)
            .map(|(a, b)| (*a, b.id, b.weight))
            .collect();
        let live = vip.tables[vip.live as usize].as_ref();
        // Building dominates an apply: skip it when the live table was built
        // from these very inputs. Its slot counts then stand too (a backend
        // new to the VIP has an id from the pool, which no table names).
        let known = live.is_some() && vip.built_from.as_ref() == Some(&inputs);
        if !known || vip.mode != want.mode {
            let table = match live {
                Some(live) if known => live.clone(),
                _ => build_table(&inputs, self.geometry.table_size),
            };
            if vip.mode != want.mode || live != Some(&table) {
                let target = 1 - vip.live;
                let previous = vip.tables[target as usize].take();
                write_table(maps, &self.geometry, vip.id * 2 + target, &table, previous.as_deref())?;
                let info = VipInfo { id: vip.id, table: vip.id * 2 + target, mode: want.mode, _pad: [0; 3] };
                maps.put_vip(&want.key, &info)?;
                vip.tables[target as usize] = Some(table);
                vip.live = target;
                vip.mode = want.mode;
                vip.generation += 1;
                vip.swapped_at = Some(SystemTime::now());
            }
            vip.built_from = Some(inputs);
            count_slots(vip, self.geometry.max_backends);
        }

        // After the switch: everyone else's entry (draining flags, changed
        // MACs), then leavers whose time is up lose their id (their
        // recorded flows rebalance).
        for (addr, state) in vip.backends.iter_mut() {
            if !matches!(state.role, Role::Leaving { until } if until <= now) {
                write_backend(maps, (vip.id, want.mode), *addr, state)?;
            }
        }
        free_expired(vip, now, maps, &mut self.backend_ids, |_| true)?;
        Ok(())
    }
}

/// The Maglev table of `inputs`.
fn build_table(inputs: &[MaglevInput], m: u32) -> Vec<BackendId> {
    let names: Vec<String> = inputs.iter().map(|(addr, _, _)| addr.to_string()).collect();
    let entries: Vec<maglev::Entry<'_>> = inputs
        .iter()
        .zip(&names)
        .map(|(&(_, id, weight), identity)| maglev::Entry { identity, id, weight })
        .collect();
    maglev::build(&entries, m)
}

/// Sets each backend's `slots` from the live table.
fn count_slots(vip: &mut VipState, max_backends: u32) {
    let mut by_id = vec![0u32; max_backends as usize];
    for id in vip.live_table().unwrap_or_default() {
        if let Some(n) = by_id.get_mut(*id as usize) {
            *n += 1;
        }
    }
    for state in vip.backends.values_mut() {
        state.slots = by_id.get(state.id as usize).copied().unwrap_or(0);
    }
}

/// Frees the backends of `vip` that are leaving with their time up and
/// match `ready`: marks their entries unused, then forgets them and
/// releases their ids.
fn free_expired(
    vip: &mut VipState,
    now: Instant,
    maps: &mut impl MapWriter,
    ids: &mut IdPool,
    ready: impl Fn(&BackendState) -> bool,
) -> Result<(), DataplaneError> {
    let expired: Vec<IpAddr> = vip
        .backends
        .iter()
        .filter(|(_, b)| matches!(b.role, Role::Leaving { until } if until <= now) && ready(b))
        .map(|(a, _)| *a)
        .collect();
    for addr in expired {
        free_backend(maps, &vip.backends[&addr])?;
        let state = vip.backends.remove(&addr).expect("present");
        info!(vip = %vip.name, backend = %addr, "backend gone; its recorded flows move to the others");
        ids.release(state.id as u32);
    }
    Ok(())
}

/// Writes `BACKENDS[id]` if it does not hold this backend's current state
/// under its VIP (id and mode).
fn write_backend(
    maps: &mut impl MapWriter,
    (vip_id, mode): (u32, u8),
    addr: IpAddr,
    state: &mut BackendState,
) -> Result<(), DataplaneError> {
    let (bytes, family) = addr::to_bytes(addr);
    let info = BackendInfo {
        addr: bytes,
        mac: state.mac.unwrap_or_default(),
        family,
        flags: state.flags(mode),
        generation: state.generation,
        vip_id,
    };
    if state.written != Some(info) {
        state.written = None;
        maps.put_backend(state.id, &info)?;
        state.written = Some(info);
    }
    Ok(())
}

/// Marks `BACKENDS[id]` unused: flows recorded for it rebalance.
fn free_backend(maps: &mut impl MapWriter, state: &BackendState) -> Result<(), DataplaneError> {
    maps.put_backend(state.id, &BackendInfo { generation: state.generation, ..BackendInfo::default() })
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

    const G: Geometry = Geometry { table_size: 251, max_vips: 4, max_backends: 16, conntrack_size: 1024 };

    fn vip(name: &str, last: u8, backends: &[(u8, u32)]) -> DesiredVip {
        DesiredVip {
            name: name.into(),
            key: addr::vip_key(IpAddr::from([192, 0, 2, last]), 80, PROTO_TCP),
            mode: MODE_DR,
            leave: Leave::Drain,
            hold: false,
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

    /// Applies `vips` now, freeing removed backends at once.
    fn apply(r: &mut Reconciler, vips: &[DesiredVip], maps: &mut MemoryMaps) -> Result<(), ReconcileError> {
        let desired = Desired { vips: vips.to_vec(), drain_timeout: Duration::ZERO };
        r.apply(&desired, Instant::now(), maps)
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
        let live: Vec<&DesiredBackend> = v.backends.iter().filter(|b| b.weight > 0).collect();
        let names: Vec<String> = live.iter().map(|b| b.addr.to_string()).collect();
        let entries: Vec<maglev::Entry<'_>> = live
            .iter()
            .zip(&names)
            .enumerate()
            .map(|(i, (b, n))| maglev::Entry { identity: n, id: i as BackendId + 1, weight: b.weight })
            .collect();
        maglev::build(&entries, G.table_size).iter().map(|id| live[*id as usize - 1].addr).collect()
    }

    fn backend<'m>(
        maps: &'m MemoryMaps,
        r: &Reconciler,
        v: &DesiredVip,
        last: u8,
    ) -> Option<&'m BackendInfo> {
        let state = r.vips()[&v.key].backends.get(&IpAddr::from([10, 0, 0, last]))?;
        maps.backends.get(&state.id)
    }

    #[test]
    fn tables_match_the_desired_backends_and_unchanged_input_writes_nothing() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let want = [vip("a", 1, &[(1, 1), (2, 1), (3, 2)]), vip("b", 2, &[(4, 1)])];
        apply(&mut r, &want, &mut maps).unwrap();
        let tables = live(&maps);
        for v in &want {
            assert_eq!(tables[&v.key], expected(v), "VIP {}", v.name);
        }
        let writes = maps.chunk_writes;
        apply(&mut r, &want, &mut maps).unwrap();
        assert_eq!(maps.chunk_writes, writes, "nothing changed, nothing written");
    }

    #[test]
    fn a_change_goes_to_the_other_table_then_flips() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1), (3, 1)])], &mut maps).unwrap();
        let key = vip("a", 1, &[]).key;
        let first = maps.vips[&key];
        let changed = vip("a", 1, &[(1, 1), (2, 1), (3, 2)]);
        apply(&mut r, std::slice::from_ref(&changed), &mut maps).unwrap();
        let second = maps.vips[&key];
        assert_eq!(first.id, second.id);
        assert_ne!(first.table, second.table, "the new table is the other one");
        assert_eq!(live(&maps)[&key], expected(&changed));
        // Back again: the first table is rewritten only where it differs.
        let before = maps.chunk_writes;
        apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1), (3, 1)])], &mut maps).unwrap();
        assert_eq!(maps.vips[&key].table, first.table);
        assert!(maps.chunk_writes - before < G.table_chunks() as usize / 2, "diff, not a full rewrite");
    }

    #[test]
    fn a_failed_write_is_followed_by_a_full_resync() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let unchanged = vip("b", 2, &[(4, 1)]);
        apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1)]), unchanged.clone()], &mut maps).unwrap();
        let want = [vip("a", 1, &[(1, 1), (3, 1)]), unchanged];
        maps.fail_next_write = true;
        assert!(apply(&mut r, &want, &mut maps).is_err());
        // Meanwhile someone scribbles over the maps.
        maps.chunks.values_mut().for_each(|c| *c = [0; 4]);
        maps.backends.values_mut().for_each(|b| b.flags = 0);
        apply(&mut r, &want, &mut maps).unwrap();
        for v in &want {
            assert_eq!(live(&maps)[&v.key], expected(v), "VIP {}", v.name);
        }
        assert_eq!(backend(&maps, &r, &want[0], 3).unwrap().flags, BACKEND_ACTIVE);
    }

    #[test]
    fn only_a_vip_whose_table_inputs_changed_is_rebuilt() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let (a, b) = (vip("a", 1, &[(1, 1), (2, 1)]), vip("b", 2, &[(3, 1), (4, 1)]));
        apply(&mut r, &[a.clone(), b.clone()], &mut maps).unwrap();
        // Spoil b's copy of its live table: a rebuild would differ from it
        // and rewrite b.
        let spoiled = vec![NO_BACKEND; G.table_size as usize];
        let state = r.vips.get_mut(&b.key).unwrap();
        state.tables[state.live as usize] = Some(spoiled.clone());
        let b_entry = maps.vips[&b.key];

        let a2 = vip("a", 1, &[(1, 1), (2, 2)]);
        apply(&mut r, &[a2.clone(), b.clone()], &mut maps).unwrap();
        assert_eq!(live(&maps)[&a.key], expected(&a2), "the changed VIP is rewritten");
        assert_eq!(r.vips()[&a.key].generation, 2);
        assert_eq!(maps.vips[&b.key], b_entry, "the unchanged VIP keeps its table");
        assert_eq!(r.vips()[&b.key].generation, 1);
        assert_eq!(r.vips()[&b.key].live_table(), Some(&spoiled[..]), "and is not rebuilt");
        assert_eq!(r.vips()[&b.key].backends.values().map(|s| s.slots).sum::<u32>(), G.table_size);

        // A new idle backend is no table input either; a weight is.
        let mut b2 = vip("b", 2, &[(3, 1), (4, 1), (5, 0)]);
        apply(&mut r, &[a2.clone(), b2.clone()], &mut maps).unwrap();
        assert_eq!(r.vips()[&b.key].generation, 1);
        b2.backends[1].weight = 3;
        apply(&mut r, &[a2, b2.clone()], &mut maps).unwrap();
        assert_eq!(live(&maps)[&b.key], expected(&b2));
        assert_eq!(r.vips()[&b.key].generation, 2);
    }

    #[test]
    fn an_adopted_table_is_compared_once_then_trusted() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 3)])], &mut maps).unwrap();
        // Pinned maps do not record weights: only a build shows that the
        // adopted table is not what the new weights give.
        let mut adopted = Reconciler::adopt(G, &maps).unwrap();
        let want = [vip("a", 1, &[(1, 1), (2, 1)])];
        apply(&mut adopted, &want, &mut maps).unwrap();
        assert_eq!(live(&maps)[&want[0].key], expected(&want[0]));
        let writes = maps.chunk_writes;
        let mut adopted = Reconciler::adopt(G, &maps).unwrap();
        apply(&mut adopted, &want, &mut maps).unwrap();
        assert!(adopted.vips()[&want[0].key].built_from.is_some(), "compared, found equal, trusted");
        apply(&mut adopted, &want, &mut maps).unwrap();
        assert_eq!(maps.chunk_writes, writes);
        assert_eq!(adopted.vips()[&want[0].key].generation, 0);
    }

    #[test]
    fn removed_vips_leave_the_maps_and_ids_are_reused_last() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        apply(&mut r, &[vip("a", 1, &[(1, 1)]), vip("b", 2, &[(2, 1)])], &mut maps).unwrap();
        let a_backend = r.vips()[&vip("a", 1, &[]).key].backends.values().next().unwrap().id;
        apply(&mut r, &[vip("b", 2, &[(2, 1)])], &mut maps).unwrap();
        assert_eq!(maps.vips.len(), 1);
        assert_eq!(maps.backends[&a_backend].flags, 0, "its backend no longer takes flows");
        apply(&mut r, &[vip("b", 2, &[(2, 1)]), vip("c", 3, &[(5, 1)])], &mut maps).unwrap();
        let c_backend = r.vips()[&vip("c", 3, &[]).key].backends.values().next().unwrap().id;
        assert_ne!(c_backend, a_backend, "a just-freed id is not handed out first");
        // A stray entry (not ours, not wanted) is removed too.
        maps.vips.insert(vip("x", 9, &[]).key, VipInfo::default());
        apply(&mut r, &[vip("b", 2, &[(2, 1)])], &mut maps).unwrap();
        assert_eq!(maps.vips.keys().copied().collect::<Vec<_>>(), vec![vip("b", 2, &[]).key]);
    }

    #[test]
    fn weight_zero_drains_and_removal_drains_until_the_timeout() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let t0 = Instant::now();
        let timeout = Duration::from_secs(30);
        let at = |r: &mut Reconciler, maps: &mut MemoryMaps, vips: &[DesiredVip], t: Instant| {
            r.apply(&Desired { vips: vips.to_vec(), drain_timeout: timeout }, t, maps).unwrap()
        };
        let all = vip("a", 1, &[(1, 1), (2, 1), (3, 1)]);
        at(&mut r, &mut maps, std::slice::from_ref(&all), t0);

        let drained = vip("a", 1, &[(1, 1), (2, 0), (3, 1)]);
        at(&mut r, &mut maps, std::slice::from_ref(&drained), t0);
        assert_eq!(live(&maps)[&all.key], expected(&drained), "weight 0: out of the table");
        assert_eq!(backend(&maps, &r, &all, 2).unwrap().flags, BACKEND_DRAINING);

        let removed = vip("a", 1, &[(1, 1), (2, 0)]);
        at(&mut r, &mut maps, std::slice::from_ref(&removed), t0);
        let gone = *backend(&maps, &r, &all, 3).unwrap();
        assert_eq!(gone.flags, BACKEND_DRAINING, "removed: draining");
        assert_eq!(r.next_deadline(), Some(t0 + timeout));

        at(&mut r, &mut maps, std::slice::from_ref(&removed), t0 + timeout);
        assert!(!r.vips()[&all.key].backends.contains_key(&IpAddr::from([10, 0, 0, 3])));
        let id =
            maps.backends.iter().find(|(_, b)| b.generation == gone.generation).map(|(id, _)| *id).unwrap();
        assert_eq!(maps.backends[&id].flags, 0, "freed after the timeout");
        assert_eq!(r.next_deadline(), None);

        // Coming back before the timeout keeps id and generation (flows stay valid).
        at(&mut r, &mut maps, &[vip("a", 1, &[(1, 1)])], t0);
        let before = *backend(&maps, &r, &all, 2).unwrap();
        at(&mut r, &mut maps, &[vip("a", 1, &[(1, 1), (2, 1)])], t0 + Duration::from_secs(1));
        let after = *backend(&maps, &r, &all, 2).unwrap();
        assert_eq!((before.generation, after.flags), (after.generation, BACKEND_ACTIVE));
    }

    #[test]
    fn a_reused_id_gets_a_new_generation() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(Geometry { max_backends: 3, ..G });
        apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1)])], &mut maps).unwrap();
        let old: BTreeMap<BackendId, u32> = maps.backends.iter().map(|(id, b)| (*id, b.generation)).collect();
        apply(&mut r, &[vip("a", 1, &[])], &mut maps).unwrap();
        apply(&mut r, &[vip("a", 1, &[(3, 1), (4, 1)])], &mut maps).unwrap();
        assert_eq!(maps.backends.len(), 2, "the same two ids, reused");
        for (id, b) in &maps.backends {
            assert_ne!(Some(&b.generation), old.get(id), "id {id} reused with its old generation");
        }
    }

    #[test]
    fn adopting_pinned_state_keeps_ids_generations_tables_and_drains() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let want = [vip("a", 1, &[(1, 1), (2, 3), (3, 0)]), vip("b", 2, &[(4, 1)])];
        apply(&mut r, &want, &mut maps).unwrap();
        let vips: Vec<(u32, u32)> = maps.vips.values().map(|v| (v.id, v.table)).collect();
        let backends = maps.backends.clone();
        let writes = maps.chunk_writes;

        let mut adopted = Reconciler::adopt(G, &maps).unwrap();
        apply(&mut adopted, &want, &mut maps).unwrap();
        assert_eq!(maps.chunk_writes, writes, "restart with the same config writes no table");
        assert_eq!(maps.vips.values().map(|v| (v.id, v.table)).collect::<Vec<_>>(), vips);
        assert_eq!(maps.backends, backends, "same ids, generations and flags");
        assert_eq!(adopted.vips()[&want[0].key].name, "a");
    }

    #[test]
    fn beyond_capacity_is_left_out_and_said_the_rest_applies() {
        let mut maps = MemoryMaps::default();
        let small = Geometry { max_vips: 1, max_backends: 3, ..G };
        let mut r = Reconciler::new(small);
        apply(&mut r, &[vip("a", 1, &[(1, 1)]), vip("b", 2, &[])], &mut maps).unwrap();
        assert_eq!(r.shortfalls().len(), 1);
        assert!(
            r.shortfalls()[0].contains("VIP b") && r.shortfalls()[0].contains("max_vips"),
            "{:?}",
            r.shortfalls()
        );
        assert_eq!(maps.vips.len(), 1, "VIP a applied all the same");
        let mut r = Reconciler::new(small);
        let mut maps = MemoryMaps::default();
        apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1), (3, 1)])], &mut maps).unwrap();
        assert!(r.shortfalls()[0].contains("10.0.0.3") && r.shortfalls()[0].contains("max_backends"));
        assert_eq!(r.vips()[&vip("a", 1, &[]).key].backends.len(), 2);
    }

    #[test]
    fn a_swap_with_every_id_in_use_completes_on_the_next_apply() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(Geometry { max_backends: 3, ..G });
        apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1)])], &mut maps).unwrap();
        let swapped = [vip("a", 1, &[(1, 1), (3, 1)])];
        apply(&mut r, &swapped, &mut maps).unwrap();
        assert_eq!(r.shortfalls().len(), 1, "no id for 10.0.0.3 while 10.0.0.2 still has one");
        apply(&mut r, &swapped, &mut maps).unwrap();
        assert!(r.shortfalls().is_empty());
        assert_eq!(live(&maps)[&swapped[0].key], expected(&swapped[0]));
    }

    #[test]
    fn an_entry_already_in_the_table_changes_only_after_the_switch() {
        // A DR → TUN change rewrites backends' entries (no MAC needed); a
        // packet still on the old table must not see them early.
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let dr = vip("a", 1, &[(1, 1)]);
        apply(&mut r, std::slice::from_ref(&dr), &mut maps).unwrap();
        maps.log_writes = true;
        let mut tun = dr.clone();
        tun.mode = lb_common::MODE_TUN;
        tun.backends[0].mac = Some([0; 6]);
        apply(&mut r, std::slice::from_ref(&tun), &mut maps).unwrap();
        let vip_at = maps.writes.iter().position(|w| *w == "vip").unwrap();
        let backend_at = maps.writes.iter().position(|w| *w == "backend").unwrap();
        assert!(vip_at < backend_at, "{:?}", maps.writes);
        // Established flows read the mode from the backend's entry.
        assert_eq!(backend(&maps, &r, &tun, 1).unwrap().flags, BACKEND_ACTIVE | BACKEND_TUN);

        // Back to DR: the MACs must be in place before packets see DR.
        maps.writes.clear();
        apply(&mut r, std::slice::from_ref(&dr), &mut maps).unwrap();
        let vip_at = maps.writes.iter().position(|w| *w == "vip").unwrap();
        let backend_at = maps.writes.iter().position(|w| *w == "backend").unwrap();
        assert!(backend_at < vip_at, "{:?}", maps.writes);
        assert_eq!(backend(&maps, &r, &dr, 1).unwrap().flags, BACKEND_ACTIVE, "DR once packets see DR");
    }

    fn tun(v: &DesiredVip) -> DesiredVip {
        let mut t = v.clone();
        t.mode = lb_common::MODE_TUN;
        t.backends.iter_mut().for_each(|b| b.mac = Some([0; 6]));
        t
    }

    #[test]
    fn a_change_to_tun_after_a_failed_write_keeps_every_backend_forwarding() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let dr = vip("a", 1, &[(1, 1), (2, 1)]);
        apply(&mut r, std::slice::from_ref(&dr), &mut maps).unwrap();
        maps.fail_next_write = true;
        assert!(apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 2)])], &mut maps).is_err());
        maps.log_writes = true;
        apply(&mut r, &[tun(&dr)], &mut maps).unwrap();
        // Every entry is rewritten (resync), each straight to TUN: none
        // stops taking flows on the way.
        assert_eq!(maps.backend_writes.len(), 2);
        assert!(maps.backend_writes.iter().all(|b| b.flags == BACKEND_ACTIVE | BACKEND_TUN));
    }

    #[test]
    fn a_backend_leaving_a_tun_vip_that_turns_dr_stops_taking_flows() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let both = tun(&vip("a", 1, &[(1, 1), (2, 1)]));
        let t0 = Instant::now();
        let drain =
            |vips: &[DesiredVip]| Desired { vips: vips.to_vec(), drain_timeout: Duration::from_secs(30) };
        r.apply(&drain(std::slice::from_ref(&both)), t0, &mut maps).unwrap();
        r.apply(&drain(&[tun(&vip("a", 1, &[(1, 1)]))]), t0, &mut maps).unwrap();
        assert_eq!(backend(&maps, &r, &both, 2).unwrap().flags, BACKEND_DRAINING | BACKEND_TUN);
        r.apply(&drain(&[vip("a", 1, &[(1, 1)])]), t0, &mut maps).unwrap();
        assert_eq!(backend(&maps, &r, &both, 2).unwrap().flags, 0, "no MAC to send its flows to in DR");
        assert_eq!(backend(&maps, &r, &both, 1).unwrap().flags, BACKEND_ACTIVE);
    }

    #[test]
    fn a_removed_vip_frees_its_backends_before_its_entry_goes() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1)])], &mut maps).unwrap();
        maps.log_writes = true;
        apply(&mut r, &[], &mut maps).unwrap();
        assert_eq!(maps.writes, ["backend", "backend", "vip"]);
        assert!(maps.vips.is_empty() && maps.backends.values().all(|b| b.flags == 0));
    }

    #[test]
    fn pinned_backends_that_cannot_be_adopted_stop_taking_flows() {
        // Established flows reach a backend without a VIP lookup, so an
        // entry nobody adopts must not stay active.
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let want = [vip("a", 1, &[(1, 1)])];
        apply(&mut r, &want, &mut maps).unwrap();
        let stray = BackendInfo { flags: BACKEND_ACTIVE, generation: 77, vip_id: 3, ..maps.backends[&1] };
        maps.backends.insert(9, stray);
        let mut adopted = Reconciler::adopt(G, &maps).unwrap();
        apply(&mut adopted, &want, &mut maps).unwrap();
        assert_eq!(maps.backends[&9].flags, 0, "no VIP has id 3");
        assert_eq!(maps.backends[&9].generation, 77, "its generation stays, so it is not handed out again");
        assert_eq!(backend(&maps, &adopted, &want[0], 1).unwrap().flags, BACKEND_ACTIVE);
    }

    #[test]
    fn unresolved_backends_stay_out_of_the_table() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(G);
        let mut want = vip("a", 1, &[(1, 1), (2, 1)]);
        want.backends[1].mac = None;
        apply(&mut r, std::slice::from_ref(&want), &mut maps).unwrap();
        assert!(live(&maps)[&want.key].iter().all(|a| *a == IpAddr::from([10, 0, 0, 1])));
        assert_eq!(backend(&maps, &r, &want, 2).unwrap().flags, 0);
        want.backends[1].mac = Some([2, 0, 0, 0, 0, 2]);
        apply(&mut r, std::slice::from_ref(&want), &mut maps).unwrap();
        assert_eq!(live(&maps)[&want.key], expected(&want));
    }
}

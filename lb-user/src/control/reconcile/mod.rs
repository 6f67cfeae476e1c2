//! Desired state → kernel maps.
//!
//! The reconciler's memory is the single source of truth; the maps are a
//! projection of it. A changed VIP gets its new Maglev table written into
//! the table packets are not using, then one write of the VIP entry
//! switches to it, so no packet ever sees a half-written table.
//!
//! Backends leave gently. Weight 0 drains a backend: no new flows, but
//! flows the connection table recorded for it stay. A backend removed from
//! the desired state drains for `drain_timeout`, then its id is freed and
//! its recorded flows are rebalanced. Freed ids are handed out again last
//! (FIFO) and with a new generation, so neither a packet holding an old
//! table nor an old connection entry can reach the id's next owner.
//!
//! When ids run short, VIPs whose backends the config lists go first, and
//! the ids they still wait for are reserved: a discovery source larger
//! than the maps never takes an id a listed backend needs.

mod ids;
#[cfg(test)]
mod tests;
mod vip;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use ids::IdPool;
use tracing::{info, warn};
use vip::{forget_previous, free_expired, mark_leavers, switch_table, update_backend};

use crate::{
    config::Capacities,
    control::desired::{Claim, Desired, DesiredVip, Leave, NextHop},
    dataplane::{
        BackendEntry, BackendId, BackendUse, DataplaneError, Maps, NO_BACKEND, Previous, Side, StatsOf,
        Store, VipId,
    },
    model::{BackendRole, Forward, VipAddr},
};

/// What is wanted but has no id left: left out, not an error. The status
/// carries these as they are (JSON `{"kind": "backend", …}`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shortfall {
    Vip { vip: String, max_vips: u32 },
    Backend { vip: String, backend: IpAddr, max_backends: u32 },
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shortfall::Vip { vip, max_vips } => {
                write!(
                    f,
                    "VIP {vip} left out: all {max_vips} VIP ids are in use (raise max_vips and restart)"
                )
            }
            Shortfall::Backend { vip, backend, max_backends } => write!(
                f,
                "VIP {vip}: backend {backend} left out: all {} backend ids are in use (raise max_backends and restart)",
                max_backends - 1
            ),
        }
    }
}

#[derive(Clone, Debug)]
pub struct VipState {
    pub name: String,
    pub id: VipId,
    pub forward: Forward,
    /// Which of the VIP's two tables packets use.
    live: Side,
    /// What the kernel holds in each table (first, second); `None` when unknown.
    tables: [Option<Vec<BackendId>>; 2],
    /// The Maglev inputs the live table is known to be built from; `None`
    /// when unknown (e.g. adopted: pinned maps do not record weights).
    built_from: Option<Vec<MaglevInput>>,
    pub backends: BTreeMap<IpAddr, BackendState>,
    /// Table switches since this daemon started, and when the last was.
    pub generation: u64,
    pub swapped_at: Option<SystemTime>,
    /// Whether the VIP entry says the other table is the one before the
    /// last switch (second chance), and for how long.
    previous: Option<Kept>,
}

/// A previous table kept for second chance: since the switch, and until
/// the window the last apply saw ends.
#[derive(Clone, Copy, Debug)]
struct Kept {
    since: Instant,
    until: Instant,
}

impl Kept {
    /// Kept from `t`, due for a look at once (the next apply sets `until`).
    fn since(t: Instant) -> Kept {
        Kept { since: t, until: t }
    }
}

/// One active backend as the table was built from it: address (its
/// identity), id and weight. The table size is fixed per reconciler.
type MaglevInput = (IpAddr, BackendId, u32);

fn side_index(side: Side) -> usize {
    match side {
        Side::First => 0,
        Side::Second => 1,
    }
}

impl VipState {
    /// Until when the table before the last switch stays readable for
    /// second chance, if it does (a window not started yet reads as none).
    pub fn previous_until(&self) -> Option<Instant> {
        self.previous.map(|k| k.until)
    }

    /// The table packets are balanced with, as written to the kernel.
    pub fn live_table(&self) -> Option<&[BackendId]> {
        self.tables[side_index(self.live)].as_deref()
    }

    fn table_mut(&mut self, side: Side) -> &mut Option<Vec<BackendId>> {
        &mut self.tables[side_index(side)]
    }
}

/// Where a backend stands in the reconciler.
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
    /// DR: the backend's MAC.
    pub mac: Option<[u8; 6]>,
    /// TUN: the next hop toward it.
    pub hop: Option<NextHop>,
    pub role: Role,
    /// Table entries this backend holds in the live table.
    pub slots: u32,
    /// What `BACKENDS[id]` is known to hold; `None` when unknown.
    written: Option<BackendEntry>,
    /// False after adoption: pinned maps do not record weights.
    weight_known: bool,
}

impl BackendState {
    /// How status and the API name where it stands.
    pub fn shown(&self) -> BackendRole {
        match self.role {
            Role::Active => BackendRole::Active,
            Role::Idle if self.mac.is_none() => BackendRole::Unresolved,
            Role::Idle => BackendRole::Draining,
            Role::Leaving { .. } => BackendRole::Leaving,
        }
    }

    /// What its entry should let packets do under a VIP forwarding by
    /// `forward`. In DR a backend without a real MAC takes no flows (one
    /// leaving a TUN VIP that turns DR has none); in TUN an unresolved next
    /// hop is the FIB's to find.
    fn used(&self, forward: Forward) -> BackendUse {
        let addressed = match forward {
            Forward::Tun => true,
            Forward::Dr => self.mac.is_some_and(|mac| mac != [0; 6]),
        };
        match self.role {
            _ if !addressed => BackendUse::Unused,
            Role::Active => BackendUse::Active,
            Role::Idle | Role::Leaving { .. } => BackendUse::Draining,
        }
    }

    fn entry(&self, addr: IpAddr, vip: VipId, forward: Forward) -> BackendEntry {
        let hop = self.hop.filter(|_| forward == Forward::Tun);
        let mac = match forward {
            Forward::Dr => self.mac,
            Forward::Tun => hop.map(|h| h.mac),
        };
        BackendEntry {
            addr,
            mac: mac.unwrap_or_default(),
            used: self.used(forward),
            forward,
            generation: self.generation,
            vip,
            hop_mtu: hop.map(|h| h.mtu),
        }
    }
}

#[derive(Debug)]
pub struct Reconciler {
    caps: Capacities,
    vips: BTreeMap<VipAddr, VipState>,
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
    shortfalls: Vec<Shortfall>,
}

impl Reconciler {
    pub fn new(caps: Capacities) -> Self {
        Self {
            caps,
            vips: BTreeMap::new(),
            vip_ids: IdPool::new(0..caps.max_vips),
            backend_ids: IdPool::new(1..caps.max_backends),
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
    pub fn adopt(maps: &Maps<impl Store>) -> Result<Self, DataplaneError> {
        let mut r = Self::new(maps.capacities());
        let mut by_id = BTreeMap::new();
        for decoded in maps.vips()? {
            let (addr, entry) = match decoded {
                Ok(vip) => vip,
                Err((what, why)) => {
                    warn!(vip = %what, error = %why, "pinned VIP entry does not decode; it will be rebuilt");
                    continue;
                }
            };
            if !r.vip_ids.reserve(entry.id) {
                warn!(vip = %addr, "pinned VIP entry is inconsistent; it will be rebuilt");
                continue;
            }
            let mut state = VipState {
                name: String::new(),
                id: entry.id,
                forward: entry.forward,
                live: entry.live,
                tables: [None, None],
                built_from: None,
                backends: BTreeMap::new(),
                generation: 0,
                swapped_at: None,
                // Its switch time is not in the maps: the window starts again.
                previous: (entry.previous == Previous::Kept).then(|| Kept::since(Instant::now())),
            };
            *state.table_mut(entry.live) = Some(maps.read_table(entry.id, entry.live)?);
            by_id.insert(entry.id, addr);
            r.vips.insert(addr, state);
        }
        for slot in maps.backends()? {
            r.next_generation = r.next_generation.max(slot.generation.wrapping_add(1));
            // An entry that does not decode is taken to carry flows: its id
            // stays reserved until `apply` marks it unused.
            let entry = match slot.entry {
                Ok(e) if e.used == BackendUse::Unused => continue,
                Ok(e) => Some(e),
                Err(_) => None,
            };
            // Ids outside the pool (0 is "no backend") are never recorded.
            if !r.backend_ids.reserve(slot.id as u32) {
                continue;
            }
            let vip = entry.and_then(|e| by_id.get(&e.vip)).and_then(|addr| r.vips.get_mut(addr));
            let (Some(entry), Some(vip)) = (entry, vip) else {
                r.orphans.push((slot.id, slot.generation));
                continue;
            };
            if vip.backends.contains_key(&entry.addr) {
                warn!(vip = %vip.name, id = slot.id, "pinned backend entry is inconsistent");
                r.orphans.push((slot.id, slot.generation));
                continue;
            }
            let slots = vip.live_table().map_or(0, |t| t.iter().filter(|&&t| t == slot.id).count() as u32);
            let role = if entry.used == BackendUse::Active { Role::Active } else { Role::Idle };
            let (mac, hop) = match (entry.forward, entry.hop_mtu) {
                (Forward::Dr, _) => (Some(entry.mac), None),
                (Forward::Tun, mtu) => (None, mtu.map(|mtu| NextHop { mac: entry.mac, mtu })),
            };
            let state = BackendState {
                id: slot.id,
                generation: entry.generation,
                weight: 0,
                mac,
                hop,
                role,
                slots,
                written: Some(entry),
                weight_known: false,
            };
            vip.backends.insert(entry.addr, state);
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

    pub fn vips(&self) -> &BTreeMap<VipAddr, VipState> {
        &self.vips
    }

    pub fn capacities(&self) -> Capacities {
        self.caps
    }

    /// When the next leaving backend is due to be freed, or the next
    /// previous table forgotten.
    pub fn next_deadline(&self) -> Option<Instant> {
        let leaving = self.vips.values().flat_map(|v| v.backends.values()).filter_map(|b| match b.role {
            Role::Leaving { until } => Some(until),
            _ => None,
        });
        leaving.chain(self.vips.values().filter_map(VipState::previous_until)).min()
    }

    /// Makes the maps match `desired` as of `now`. On error the next call
    /// rewrites everything, whatever failed half-way. Memory changes only
    /// after the writes it stands for succeeded, so it never claims more
    /// than the maps hold.
    pub fn apply(
        &mut self,
        desired: &Desired,
        now: Instant,
        maps: &mut Maps<impl Store>,
    ) -> Result<(), DataplaneError> {
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

    /// What is wanted but has no id left, as of the last `apply`.
    pub fn shortfalls(&self) -> &[Shortfall] {
        &self.shortfalls
    }

    fn apply_all(
        &mut self,
        desired: &Desired,
        now: Instant,
        maps: &mut Maps<impl Store>,
    ) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<VipAddr> = desired.vips.iter().map(|v| v.addr).collect();
        let gone: Vec<VipAddr> = self.vips.keys().filter(|k| !wanted.contains(k)).copied().collect();
        for addr in gone {
            // Backends first: established flows skip the VIP lookup, so
            // the VIP entry alone does not stop them.
            for b in self.vips[&addr].backends.values() {
                maps.put_backend(b.id, &BackendEntry::unused(b.generation))?;
            }
            maps.delete_vip(&addr)?;
            let vip = self.vips.remove(&addr).expect("present");
            info!(vip = %vip.name, address = %addr, "VIP removed");
            self.vip_ids.release(vip.id);
            vip.backends.values().for_each(|b| self.backend_ids.release(b.id as u32));
        }
        let ours: BTreeSet<VipAddr> = self.vips.keys().copied().collect();
        maps.delete_vips_except(|a| ours.contains(a) || wanted.contains(a))?;
        let (listed, discovered): (Vec<&DesiredVip>, Vec<&DesiredVip>) =
            desired.vips.iter().partition(|v| v.claim == Claim::Listed);
        for vip in listed {
            self.apply_wanted(vip, desired, 0, now, maps)?;
        }
        let reserved = self.shortfalls.iter().filter(|s| matches!(s, Shortfall::Backend { .. })).count();
        for vip in discovered {
            self.apply_wanted(vip, desired, reserved, now, maps)?;
        }
        while let Some(&(id, generation)) = self.orphans.last() {
            maps.put_backend(id, &BackendEntry::unused(generation))?;
            self.orphans.pop();
            self.backend_ids.release(id as u32);
        }
        Ok(())
    }

    /// One VIP of the desired state; newcomers leave `reserved` backend ids
    /// free for others.
    fn apply_wanted(
        &mut self,
        vip: &DesiredVip,
        desired: &Desired,
        reserved: usize,
        now: Instant,
        maps: &mut Maps<impl Store>,
    ) -> Result<(), DataplaneError> {
        if vip.hold
            && let Some(state) = self.vips.get_mut(&vip.addr)
        {
            state.name.clone_from(&vip.name);
            // Its window ends all the same (or every tick would be due).
            return forget_previous(state, vip, now, maps);
        }
        let drain = match vip.leave {
            Leave::Drain => desired.drain_timeout,
            Leave::AtOnce => Duration::ZERO,
        };
        self.apply_vip(vip, drain, reserved, now, maps)
    }

    /// Whether an apply now could place something the last one left out.
    pub fn could_place_more(&self) -> bool {
        self.shortfalls.iter().any(|s| match s {
            Shortfall::Vip { .. } => self.vip_ids.free() > 0,
            Shortfall::Backend { .. } => self.backend_ids.free() > 0,
        })
    }

    /// Adds the VIP (with a fresh id) if it is new; false when no id is left.
    fn add_vip(&mut self, want: &DesiredVip, maps: &mut Maps<impl Store>) -> Result<bool, DataplaneError> {
        if !self.vips.contains_key(&want.addr) {
            let Some(id) = self.vip_ids.take() else {
                self.shortfalls.push(Shortfall::Vip { vip: want.name.clone(), max_vips: self.caps.max_vips });
                return Ok(false);
            };
            if let Err(e) = maps.reset_stats(StatsOf::Vip, id) {
                self.vip_ids.release(id);
                return Err(e);
            }
            info!(vip = %want.name, address = %want.addr, "VIP added");
            let state = VipState {
                name: want.name.clone(),
                id,
                forward: want.forward,
                // The first table goes to the other side, the first.
                live: Side::Second,
                tables: [None, None],
                built_from: None,
                backends: BTreeMap::new(),
                generation: 0,
                swapped_at: None,
                previous: None,
            };
            self.vips.insert(want.addr, state);
        }
        Ok(true)
    }

    fn apply_vip(
        &mut self,
        want: &DesiredVip,
        drain_timeout: Duration,
        reserved: usize,
        now: Instant,
        maps: &mut Maps<impl Store>,
    ) -> Result<(), DataplaneError> {
        if !self.add_vip(want, maps)? {
            return Ok(());
        }
        let Reconciler { caps, vips, backend_ids, next_generation, shortfalls, .. } = self;
        let caps = *caps;
        let vip = vips.get_mut(&want.addr).expect("added above");
        vip.name.clone_from(&want.name);
        mark_leavers(vip, want, now, drain_timeout);
        // Leavers whose time is up and whom no table names any more go
        // before new backends take ids: a full pool must not block a swap.
        free_expired(vip, now, maps, backend_ids, |b| b.slots == 0)?;
        for b in &want.backends {
            let state = match vip.backends.get_mut(&b.addr) {
                Some(state) => state,
                None => {
                    let Some(id) = backend_ids.take_leaving(reserved) else {
                        shortfalls.push(Shortfall::Backend {
                            vip: vip.name.clone(),
                            backend: b.addr,
                            max_backends: caps.max_backends,
                        });
                        continue;
                    };
                    let id = id as BackendId;
                    if let Err(e) = maps.reset_stats(StatsOf::Backend, id as u32) {
                        backend_ids.release(id as u32);
                        return Err(e);
                    }
                    info!(vip = %vip.name, backend = %b.addr, weight = b.weight, "backend added");
                    let state = BackendState {
                        id,
                        generation: *next_generation,
                        weight: b.weight,
                        mac: b.mac,
                        hop: b.hop,
                        role: Role::Idle,
                        slots: 0,
                        written: None,
                        weight_known: true,
                    };
                    *next_generation = next_generation.wrapping_add(1);
                    vip.backends.entry(b.addr).or_insert(state)
                }
            };
            update_backend(&vip.name, want.forward, b, state);
        }
        switch_table(vip, want, now, caps, maps)?;
        forget_previous(vip, want, now, maps)?;
        free_expired(vip, now, maps, backend_ids, |_| true)
    }
}

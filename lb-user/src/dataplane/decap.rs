//! Program `xlb_decap` for the backends of TUN-mode VIPs: attach it, keep
//! its set of VIP addresses and of balancer sources it trusts, read its
//! counters, detach it. Like program
//! `xlb`, it is pinned (under /sys/fs/bpf/xlb-decap/<interface>) and keeps
//! working after the command exits.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{
        HashMap, Map, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::Xdp,
};
use lb_common::{
    DECAP_DONE, DECAP_NOT_OURS, DECAP_PASSED, DECAP_SECOND_CHANCE_FORWARDED, DECAP_SECOND_CHANCE_KEPT,
    DECAP_SECOND_CHANCE_NO_ROUTE, DECAP_SLOTS, DECAP_UNTRUSTED, DecapKey, DecapSource, maps,
};
use serde::Serialize;

use super::{
    loader::{self, LoaderError},
    wire::{addr_from_wire, addr_to_wire},
};
use crate::{
    model::{Attachment, Prefix, XdpMode},
    net::Interface,
};

pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf-decap"));

const PROGRAM: &str = "xlb_decap";

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("map {map}: {op} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no xlb_decap pinned at {path} (run `xlb decap attach` first)")]
    NotAttached { path: PathBuf },
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> DecapError {
    move |source| DecapError::Map { map, op, source }
}

pub fn default_pin_dir(interface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/xlb-decap").join(interface)
}

fn key(a: IpAddr) -> DecapKey {
    let (addr, family) = addr_to_wire(a);
    DecapKey { addr, family, _pad: [0; 3] }
}

/// What `xlb_decap` accepts: tunnels to `vips` from `sources` (the
/// balancers' outer source addresses).
#[derive(Clone, Debug, Default)]
pub struct Accept {
    pub vips: Vec<IpAddr>,
    pub sources: Vec<Prefix>,
}

fn source_key(p: Prefix) -> Key<DecapSource> {
    let (addr, family) = addr_to_wire(p.addr);
    Key::new(8 + u32::from(p.len), DecapSource { family, addr })
}

/// Attaches `xlb_decap` to `iface` (or swaps it in through the pinned link)
/// and makes what it accepts exactly `accept`. Returns how it is attached.
pub fn attach(
    iface: &Interface,
    pin_dir: &Path,
    accept: &Accept,
    mode: XdpMode,
) -> Result<Attachment, DecapError> {
    loader::prepare_pin_dir(pin_dir)?;
    forget_stale_maps(pin_dir)?;
    let pins: Vec<(&str, PathBuf)> = maps::DECAP_ALL.iter().map(|m| (*m, pin_dir.join(m))).collect();
    let mut ebpf_loader = EbpfLoader::new();
    for (name, path) in &pins {
        ebpf_loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = ebpf_loader.load(DECAP_OBJECT).map_err(LoaderError::Load)?;
    let program = program_mut(&mut ebpf);
    program.load().map_err(LoaderError::Verify)?;
    // What it accepts is in place before the new program sees a packet.
    set_accept(&mut ebpf, accept)?;
    loader::attach(program_mut(&mut ebpf), iface, &pin_dir.join(loader::LINK_PIN), mode).map_err(Into::into)
}

/// Unpins maps an older `xlb_decap` left with another shape (fewer
/// counter slots), so this one creates its own: they hold nothing an
/// attach does not rewrite, and a program still using them keeps them
/// until the link is swapped.
fn forget_stale_maps(pin_dir: &Path) -> Result<(), DecapError> {
    let stats = pin_dir.join(maps::DECAP_STATS);
    let Ok(pinned) = MapData::from_pin(&stats) else { return Ok(()) };
    if pinned.info().map(|i| i.max_entries()).ok() == Some(DECAP_SLOTS) {
        return Ok(());
    }
    for m in maps::DECAP_ALL {
        loader::remove_pin(pin_dir.join(m))?;
    }
    Ok(())
}

/// Loads `xlb_decap` with private maps accepting `accept`, attached
/// nowhere: for BPF_PROG_TEST_RUN. The program is [`program_mut`].
pub fn load_detached(accept: &Accept) -> Result<aya::Ebpf, DecapError> {
    let mut ebpf = EbpfLoader::new().load(DECAP_OBJECT).map_err(LoaderError::Load)?;
    program_mut(&mut ebpf).load().map_err(LoaderError::Verify)?;
    set_accept(&mut ebpf, accept)?;
    Ok(ebpf)
}

pub fn program_mut(ebpf: &mut aya::Ebpf) -> &mut Xdp {
    ebpf.program_mut(PROGRAM).expect("object defines xlb_decap").try_into().expect("XDP")
}

fn sources_mut(ebpf: &mut aya::Ebpf) -> Result<LpmTrie<&mut MapData, DecapSource, u8>, DecapError> {
    let map = ebpf.map_mut(maps::DECAP_SOURCES).expect("object defines DECAP_SOURCES");
    map.try_into().map_err(map_err(maps::DECAP_SOURCES, "open"))
}

/// A source key as comparable parts (the trie's key type has no equality).
type SourceParts = (u32, DecapSource);

/// Makes the VIP and source sets exactly `accept`'s. Sources go first and
/// are removed last, so a replaced list never drops a balancer's packets.
fn set_accept(ebpf: &mut aya::Ebpf, accept: &Accept) -> Result<(), DecapError> {
    let stale = add_sources(ebpf, &accept.sources)?;
    set_vips(ebpf, &accept.vips)?;
    let mut sources = sources_mut(ebpf)?;
    for (len, data) in stale {
        sources.remove(&Key::new(len, data)).map_err(map_err(maps::DECAP_SOURCES, "delete"))?;
    }
    Ok(())
}

/// Adds `wanted` to the trusted sources; returns those present and not wanted.
fn add_sources(ebpf: &mut aya::Ebpf, wanted: &[Prefix]) -> Result<Vec<SourceParts>, DecapError> {
    let mut sources = sources_mut(ebpf)?;
    let wanted: Vec<SourceParts> =
        wanted.iter().map(|p| source_key(*p)).map(|k| (k.prefix_len(), k.data())).collect();
    let present: Vec<SourceParts> = sources
        .keys()
        .map(|k| k.map(|k| (k.prefix_len(), k.data())))
        .collect::<Result<_, _>>()
        .map_err(map_err(maps::DECAP_SOURCES, "iterate"))?;
    for (len, data) in &wanted {
        sources.insert(&Key::new(*len, *data), 1, 0).map_err(map_err(maps::DECAP_SOURCES, "write"))?;
    }
    Ok(present.into_iter().filter(|k| !wanted.contains(k)).collect())
}

/// Makes the VIP set exactly `vips`.
fn set_vips(ebpf: &mut aya::Ebpf, vips: &[IpAddr]) -> Result<(), DecapError> {
    let map = ebpf.map_mut(maps::DECAP_VIPS).expect("object defines DECAP_VIPS");
    let mut set: HashMap<&mut MapData, DecapKey, u8> =
        map.try_into().map_err(map_err(maps::DECAP_VIPS, "open"))?;
    let wanted: Vec<DecapKey> = vips.iter().map(|a| key(*a)).collect();
    let present: Vec<DecapKey> =
        set.keys().collect::<Result<_, _>>().map_err(map_err(maps::DECAP_VIPS, "iterate"))?;
    for k in wanted.iter() {
        set.insert(k, 1, 0).map_err(map_err(maps::DECAP_VIPS, "write"))?;
    }
    for k in present.iter().filter(|k| !wanted.contains(k)) {
        set.remove(k).map_err(map_err(maps::DECAP_VIPS, "delete"))?;
    }
    Ok(())
}

/// Counters and VIPs of an attached `xlb_decap`.
#[derive(Debug, Serialize)]
pub struct DecapStatus {
    pub pin_dir: PathBuf,
    pub vips: Vec<IpAddr>,
    /// Outer sources it accepts tunnels from.
    pub sources: Vec<Prefix>,
    /// Packets decapsulated for one of `vips` and passed on.
    pub decapsulated: u64,
    /// Tunnelled packets for other addresses, left as they were.
    pub not_ours: u64,
    /// Tunnelled to one of `vips` from a source not in `sources`: dropped.
    pub untrusted: u64,
    /// Second chance: sent on to the previous owner (no socket here).
    pub second_chance_forwarded: u64,
    /// Second chance: delivered here (the flow has a socket here).
    pub second_chance_kept: u64,
    /// Second chance: no socket here and no way to the previous owner.
    pub second_chance_no_route: u64,
    /// Everything else (not tunnelled), passed untouched.
    pub passed: u64,
}

pub fn status(pin_dir: &Path) -> Result<DecapStatus, DecapError> {
    let open = |name: &str| {
        MapData::from_pin(pin_dir.join(name))
            .and_then(Map::from_map_data)
            .map_err(|_| DecapError::NotAttached { path: pin_dir.to_owned() })
    };
    let set: HashMap<MapData, DecapKey, u8> =
        open(maps::DECAP_VIPS)?.try_into().map_err(map_err(maps::DECAP_VIPS, "open"))?;
    let stats: PerCpuArray<MapData, u64> =
        open(maps::DECAP_STATS)?.try_into().map_err(map_err(maps::DECAP_STATS, "open"))?;
    let count = |slot: u32| -> Result<u64, DecapError> {
        let values = stats.get(&slot, 0).map_err(map_err(maps::DECAP_STATS, "read"))?;
        Ok(values.iter().sum())
    };
    let mut vips: Vec<IpAddr> =
        set.keys().filter_map(Result::ok).filter_map(|k| addr_from_wire(k.addr, k.family).ok()).collect();
    vips.sort();
    let trie: LpmTrie<MapData, DecapSource, u8> =
        open(maps::DECAP_SOURCES)?.try_into().map_err(map_err(maps::DECAP_SOURCES, "open"))?;
    let mut sources: Vec<Prefix> = trie
        .keys()
        .filter_map(Result::ok)
        .filter_map(|k| {
            let addr = addr_from_wire(k.data().addr, k.data().family).ok()?;
            Some(Prefix { addr, len: u8::try_from(k.prefix_len().checked_sub(8)?).ok()? })
        })
        .collect();
    sources.sort();
    Ok(DecapStatus {
        pin_dir: pin_dir.to_owned(),
        vips,
        sources,
        decapsulated: count(DECAP_DONE)?,
        not_ours: count(DECAP_NOT_OURS)?,
        untrusted: count(DECAP_UNTRUSTED)?,
        second_chance_forwarded: count(DECAP_SECOND_CHANCE_FORWARDED)?,
        second_chance_kept: count(DECAP_SECOND_CHANCE_KEPT)?,
        second_chance_no_route: count(DECAP_SECOND_CHANCE_NO_ROUTE)?,
        passed: count(DECAP_PASSED)?,
    })
}

/// Detaches `xlb_decap` and removes its pins.
pub fn detach(pin_dir: &Path) -> Result<bool, DecapError> {
    Ok(loader::remove_pins(pin_dir, &maps::DECAP_ALL)?)
}

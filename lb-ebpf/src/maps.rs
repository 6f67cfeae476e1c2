//! Every map and load-time global of program `xlb`. Sizes here are
//! placeholders: the loader sets the real capacities from the config.

use aya_ebpf::{
    Global,
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use lb_common::{
    BackendInfo, ConnSet, Counter, GlobalStats, MaglevChunk, Meta, VIP_FILTER_WORDS, VipInfo, VipKey,
    conn_sets,
    limits::{DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS},
};
use lb_ebpf::net::Mac;

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Bitmap of `vip_filter_bit`s of the VIP addresses: a clear bit means no
/// VIP has this address, and the packet skips the VIPS hash lookup.
#[map(name = "VIP_FILTER")]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "MAGLEV")]
pub static MAGLEV: Array<MaglevChunk> = Array::with_max_entries(1, 0);

/// Flow → backend, in sets of slots (see `lb_common::ConnSet`); one table
/// for every CPU, so a flow seen on another CPU still hits. Mappable, so
/// the value area starts on a page (every slot on a line of its own) and
/// the daemon reads the table without a syscall per set.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: Array<ConnSet> =
    Array::with_max_entries(conn_sets(DEFAULT_CONNTRACK_SIZE), BPF_F_MMAPABLE);

/// One `GlobalStats` per CPU, at index 0.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "VIP_STATS")]
pub static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Version stamp and capacities, for userspace only (see `lb_common::Meta`).
#[map(name = "META")]
pub static META: Array<Meta> = Array::with_max_entries(1, 0);

#[unsafe(no_mangle)]
pub static TABLE_SIZE: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static TABLE_CHUNKS: Global<u32> = Global::new(0);

/// The loader writes the MAC's six bytes; read as halfwords (see `Mac`).
#[unsafe(no_mangle)]
pub static IFACE_MAC: Global<Mac> = Global::new(Mac([0; 3]));

#[unsafe(no_mangle)]
pub static CONNTRACK_SETS: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static CONNTRACK_SEED: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static CONN_INSERT_LIMIT: Global<u64> = Global::new(0);

/// The outer source addresses: the loader writes their octets, read here
/// as words in memory order.
#[unsafe(no_mangle)]
pub static TUN_SRC_V4: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static TUN_SRC_V6: Global<[u32; 4]> = Global::new([0; 4]);

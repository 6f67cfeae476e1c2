//! Every map and load-time global of program `xlb`. Sizes here are
//! placeholders: the loader sets the real capacities from the config.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use lb_common::{
    BackendInfo, Counter, MaglevChunk, Meta, REASON_SLOTS, VipInfo, VipKey,
    limits::{DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS},
};

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "MAGLEV")]
pub static MAGLEV: Array<MaglevChunk> = Array::with_max_entries(1, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(REASON_SLOTS, 0);

#[map(name = "VIP_STATS")]
pub static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[unsafe(no_mangle)]
pub static TABLE_SIZE: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static TABLE_CHUNKS: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
pub static IFACE_MAC: Global<[u8; 6]> = Global::new([0; 6]);

/// Version stamp and capacities, for userspace only (see `lb_common::Meta`).
#[map(name = "META")]
pub static META: Array<Meta> = Array::with_max_entries(1, 0);

//! The contract between the xlb XDP programs and the xlb daemon: map names,
//! capacities, the `#[repr(C)]` values stored in the maps, the pass/drop
//! reasons, and the flow hash both sides must agree on.
//!
//! Map values hold integers and byte arrays only, so any bit pattern read
//! from a map is a valid value.
#![no_std]

mod conntrack;
mod hash;
mod reason;
mod types;

pub use conntrack::{CONN_WAYS, ConnSet, ConnSlot, conn_seal, conn_set_index, conn_set_index2, conn_sets};
pub use hash::{VIP_FILTER_WORDS, flow_hash, vip_filter_bit, vip_filter_bit_v4};
pub use reason::{Action, EVENT_SLOTS, Event, REASON_SLOTS, Reason};
pub use types::*;

/// Map names, as they appear in the object file and under the pin directory.
pub mod maps {
    pub const VIPS: &str = "VIPS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const STATS: &str = "STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const META: &str = "META";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const VIP_FILTER: &str = "VIP_FILTER";

    /// Program `xlb_decap`'s maps.
    pub const DECAP_VIPS: &str = "DECAP_VIPS";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    pub const DECAP_SOURCES: &str = "DECAP_SOURCES";
    pub const DECAP_ALL: [&str; 3] = [DECAP_VIPS, DECAP_STATS, DECAP_SOURCES];

    /// Every map of program `xlb`, in pin order.
    pub const ALL: [&str; 9] =
        [VIPS, BACKENDS, MAGLEV, STATS, VIP_STATS, BACKEND_STATS, META, CONNTRACK, VIP_FILTER];
}

/// Load-time globals of program `xlb` (set by the loader, read-only to the program).
pub mod globals {
    /// Maglev table size M (prime).
    pub const TABLE_SIZE: &str = "TABLE_SIZE";
    /// `MaglevChunk`s per table: `ceil(M / MAGLEV_LANES)`.
    pub const TABLE_CHUNKS: &str = "TABLE_CHUNKS";
    /// MAC address of the interface the program is attached to.
    pub const IFACE_MAC: &str = "IFACE_MAC";
    /// Connection-table inserts allowed per CPU per second (0: no limit).
    pub const CONN_INSERT_LIMIT: &str = "CONN_INSERT_LIMIT";
    /// TUN mode's outer source addresses: the loader writes their octets
    /// ([u8; 4] and [u8; 16]), the program reads them as words.
    pub const TUN_SRC_V4: &str = "TUN_SRC_V4";
    pub const TUN_SRC_V6: &str = "TUN_SRC_V6";
    /// Sets in `CONNTRACK` (`conn_sets(conntrack_size)`).
    pub const CONNTRACK_SETS: &str = "CONNTRACK_SETS";
    /// The connection table's seed (`Meta::conntrack_seed`).
    pub const CONNTRACK_SEED: &str = "CONNTRACK_SEED";
}

/// Capacity defaults and hard limits; the config may lower or raise the
/// defaults within the limits.
pub mod limits {
    /// Maglev table size: the Maglev paper's M, prime.
    pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
    /// Largest table size accepted (2^20 + 7, prime).
    pub const MAX_TABLE_SIZE: u32 = 1_048_583;
    pub const DEFAULT_MAX_VIPS: u32 = 64;
    pub const MAX_VIPS: u32 = 1024;
    /// Backend slots (one per VIP-backend pair); id 0 means "no backend".
    pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
    pub const MAX_BACKENDS: u32 = u16::MAX as u32;
    /// Every VIP owns two tables: one live, one being rebuilt.
    pub const TABLES_PER_VIP: u32 = 2;
    pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;
    pub const MAX_CONNTRACK_SIZE: u32 = 64 << 20;
    pub const DEFAULT_CONN_INSERT_LIMIT: u64 = 100_000;
}

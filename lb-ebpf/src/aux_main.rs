//! Helper programs for tests and benchmarks.
//!
//! - `xdp_pass`: a veth only delivers XDP_TX frames to a peer that runs an
//!   XDP program, so test topologies put this one on the peer.
//! - `xdp_tx`, `xdp_macswap`, `xdp_drop`, `xdp_line`: the benchmark's
//!   baselines.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::{BPF_F_MMAPABLE, xdp_action},
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};

/// `xdp_line`'s lines: as many as the loader sets in `LINE_COUNT` (the
/// benchmark: as many as xlb's connection table has slots). Mappable, as
/// that table is, so both sit in memory allocated the same way.
#[map(name = "LINES")]
static LINES: Array<[u64; 8]> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[unsafe(no_mangle)]
static LINE_COUNT: Global<u32> = Global::new(1);

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn xdp_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[xdp]
pub fn xdp_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Swaps source and destination MACs and bounces the frame: the least any
/// L2 forwarder does.
#[xdp]
pub fn xdp_macswap(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 12 > end {
        return xdp_action::XDP_DROP;
    }
    let eth = start as *mut [u8; 6];
    // SAFETY: the first 12 bytes are inside the frame (checked above).
    unsafe {
        let dst = *eth;
        *eth = *eth.add(1);
        *eth.add(1) = dst;
    }
    xdp_action::XDP_TX
}

/// Reads a word of the line of `LINES` that the frame's IPv4 addresses
/// and ports pick, then bounces the frame unchanged: the least a program
/// that keeps state per flow does. Fed a distinct flow every call, it
/// shows what one line fetched from memory (and its page looked up) costs:
/// the floor under any per-flow lookup.
#[xdp]
pub fn xdp_line(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    // Ethernet (14) + IPv4 addresses (bytes 26..34) + ports (34..38).
    if start + 38 > end {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: bytes 26..38 are inside the frame (checked above).
    let [src, dst, ports] = unsafe { ((start + 26) as *const [u32; 3]).read_unaligned() };
    let mut h = src ^ dst.rotate_left(11) ^ ports.rotate_left(22);
    h = (h ^ h >> 16).wrapping_mul(0x85eb_ca6b);
    h = (h ^ h >> 13).wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    let index = ((h as u64 * LINE_COUNT.load() as u64) >> 32) as u32;
    match LINES.get(index) {
        // Never true (the map starts zeroed): the read must not be dropped.
        Some(line) if line[0] == u64::MAX => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_TX,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

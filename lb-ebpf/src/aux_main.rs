//! Helper programs for tests and benchmarks.
//!
//! - `xdp_pass`: a veth only delivers XDP_TX frames to a peer that runs an
//!   XDP program, so test topologies put this one on the peer.
//! - `xdp_tx`, `xdp_macswap`, `xdp_drop`: the benchmark's baselines.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! Program `xlb`: balances packets addressed to a VIP across its backends.
#![no_std]
#![no_main]

mod maps;
mod ptr;
mod select;
mod stats;
mod xmit;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{Action, GlobalStats, Reason};
use lb_ebpf::parse::{Frame as _, parse};

use crate::ptr::Packet;

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let Some(stats) = stats::globals() else {
        return xdp_action::XDP_PASS;
    };
    let pkt = Packet::new(&ctx);
    let reason = match balance(&pkt, stats) {
        Ok(()) => Reason::Forwarded,
        Err(reason) => reason,
    };
    stats::count_reason(stats, reason, pkt.len() as u64);
    match reason.action() {
        Action::Tx => xdp_action::XDP_TX,
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn balance(pkt: &Packet, stats: &mut GlobalStats) -> Result<(), Reason> {
    let parsed = parse(pkt)?;
    let target = select::backend(&parsed, stats)?;
    xmit::to_backend_l2(pkt, target.backend)?;
    let bytes = pkt.len() as u64;
    stats::count_vip(target.vip_id, bytes);
    stats::count_backend(target.backend_id, bytes);
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction; a surviving panic path fails verification.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! Program `xlb`: balances packets addressed to a VIP across its backends.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod encap;
mod icmp;
mod maps;
mod select;
mod stats;
mod xmit;

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{Action, Event, GlobalStats, MODE_TUN, Reason};
use lb_ebpf::parse::{Frame as _, Parsed, parse};

use lb_ebpf::ptr::Packet;

use crate::xmit::Tun;

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let Some(stats) = stats::globals() else {
        return xdp_action::XDP_PASS;
    };
    let pkt = Packet::new(&ctx);
    let reason = match balance(&pkt, stats) {
        Ok(reason) | Err(reason) => reason,
    };
    stats::count_reason(stats, reason, pkt.len() as u64);
    match reason.action() {
        Action::Tx => xdp_action::XDP_TX,
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

/// The verdict for a packet: forwarded (or handed to the kernel on its way
/// to a backend) in `Ok`, anything else in `Err`.
///
/// A new flow's choice of backend, TUN encapsulation and ICMP errors run
/// as separate BPF functions, each with its own stack frame: inlined, they
/// would not fit the 512-byte stack. The parser is one too (inlined and
/// written field by field, it fits, but measured slower). The
/// connection-table lookup, all an established flow needs, is inlined
/// (`select::backend`).
#[inline(always)]
fn balance(pkt: &Packet, stats: &mut GlobalStats) -> Result<Reason, Reason> {
    // The host's own traffic leaves here, before the parse; a malformed
    // frame to the host is the host's to drop.
    let filtered = select::may_be_vip_frame(pkt);
    if filtered == Some(false) {
        return Err(Reason::PassNotVip);
    }
    let mut parsed = MaybeUninit::<Parsed>::uninit();
    parse_into(pkt, &mut parsed)?;
    // SAFETY: parse_into wrote it (it returned Ok).
    let parsed = unsafe { parsed.assume_init_ref() };
    if filtered.is_none() && !select::may_be_vip(&parsed.flow) {
        return Err(Reason::PassNotVip);
    }
    let target = select::backend(parsed, stats)?;
    // Counted before encapsulation: the frame as it arrived.
    let bytes = pkt.len() as u64;
    let reason = if target.backend.mode() == MODE_TUN {
        if !target.backend.has_hop() {
            stats::count_event(stats, Event::TunFibLookup);
        }
        let tun = match select::second(&target) {
            None => xmit::to_backend_tun(pkt, parsed, target.backend),
            // Too big wrapped twice: wrapped once, rather than lower the
            // client's path MTU for a hint (the packet is unchanged).
            Some(second) => match xmit::to_backend_tun_twice(pkt, parsed, target.backend, second) {
                Tun::TooBig { .. } => xmit::to_backend_tun(&pkt.reload(), parsed, target.backend),
                sent => {
                    stats::count_event(stats, Event::SecondChance);
                    sent
                }
            },
        };
        match tun {
            Tun::Sent(reason) => reason,
            // No ICMP error about an ICMP error (RFC 1122).
            Tun::TooBig { .. } if parsed.icmp_error => return Err(Reason::DropTooBig),
            Tun::TooBig { mtu } => return Err(icmp::too_big(&pkt.reload(), parsed, mtu as usize)),
            Tun::Failed(reason) => return Err(reason),
        }
    } else {
        xmit::to_backend_l2(pkt, target.backend)?;
        Reason::Forwarded
    };
    stats::count_vip(u32::from(target.backend.vip_id), bytes);
    stats::count_backend(target.backend_id, bytes);
    Ok(reason)
}

/// Writes into the caller's frame: zero-initializing a `Parsed` there
/// first costs an out-of-line byte-wise memset per packet.
#[inline(never)]
fn parse_into(pkt: &Packet, out: &mut MaybeUninit<Parsed>) -> Result<(), Reason> {
    out.write(parse(pkt)?);
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

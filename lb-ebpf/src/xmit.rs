//! Writing the frame back out.

use lb_common::{BackendInfo, Reason};
use network_types::eth::EthHdr;

use crate::{maps::IFACE_MAC, ptr::Packet};

/// DR: same frame, addressed to the backend's MAC from ours.
#[inline(always)]
pub fn to_backend_l2(pkt: &Packet, backend: &BackendInfo) -> Result<(), Reason> {
    let eth = pkt.at_mut::<EthHdr>(0).ok_or(Reason::DropMalformed)?;
    // SAFETY: bounds-checked above; XDP owns the frame.
    unsafe {
        (*eth).dst_addr = backend.mac;
        (*eth).src_addr = IFACE_MAC.load();
    }
    Ok(())
}

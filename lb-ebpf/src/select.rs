//! Which backend gets a flow: VIP lookup, then the VIP's live Maglev table.

use lb_common::{BackendId, BackendInfo, FlowKey, MAGLEV_LANES, NO_BACKEND, Reason, flow_hash};

use crate::maps::{BACKENDS, MAGLEV, TABLE_CHUNKS, TABLE_SIZE, VIPS};

pub struct Target {
    pub vip_id: u32,
    pub backend_id: BackendId,
    pub backend: &'static BackendInfo,
}

#[inline(always)]
pub fn backend(flow: &FlowKey) -> Result<Target, Reason> {
    // SAFETY: the value is only read, and VIPS entries are replaced whole.
    let vip = unsafe { VIPS.get(flow.vip_key()) }.ok_or(Reason::PassNotVip)?;
    let slot = flow_hash(flow)
        .checked_rem(TABLE_SIZE.load())
        .ok_or(Reason::DropNoBackend)?;
    let chunk = vip.table * TABLE_CHUNKS.load() + slot / MAGLEV_LANES;
    let lanes = MAGLEV.get(chunk).ok_or(Reason::DropNoBackend)?;
    let backend_id = lanes[(slot % MAGLEV_LANES) as usize];
    if backend_id == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    let backend = BACKENDS.get(backend_id as u32).ok_or(Reason::DropNoBackend)?;
    Ok(Target {
        vip_id: vip.id,
        backend_id,
        backend,
    })
}

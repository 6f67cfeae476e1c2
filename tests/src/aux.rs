//! The helper programs of object `lb-ebpf-aux`: a pass program for veth
//! peers (veth delivers XDP_TX frames only to a peer running XDP) and the
//! benchmark's baselines. `xlb` itself never attaches them.

use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode},
};

use crate::netns::Netns;

static AUX_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_AUX_OBJECT"));

/// Loads helper `program` (for BPF_PROG_TEST_RUN, say); it is
/// [`program_mut`]`(&mut ebpf, program)`.
pub fn load(program: &str) -> anyhow::Result<Ebpf> {
    let mut ebpf = Ebpf::load(AUX_OBJECT)?;
    program_mut(&mut ebpf, program)?.load()?;
    Ok(ebpf)
}

/// Loads `xdp_line` with `lines` lines of 64 bytes to read from.
pub fn load_line(lines: u32) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("LINES", lines)
        .override_global("LINE_COUNT", &lines, true)
        .load(AUX_OBJECT)?;
    program_mut(&mut ebpf, "xdp_line")?.load()?;
    Ok(ebpf)
}

pub fn program_mut<'e>(ebpf: &'e mut Ebpf, program: &str) -> anyhow::Result<&'e mut Xdp> {
    let found = ebpf.program_mut(program).and_then(|p| p.try_into().ok());
    found.ok_or_else(|| anyhow::anyhow!("no XDP program {program} in the helper object"))
}

/// A helper program attached to an interface; detached on drop.
pub struct Attached {
    _ebpf: Ebpf,
}

/// Attaches helper `program` in native mode to `interface` in `ns`.
pub fn attach(program: &str, interface: &str, ns: &Netns) -> anyhow::Result<Attached> {
    attach_loaded(load(program)?, program, interface, ns)
}

/// Attaches `program` of `ebpf`, loaded by [`load`] or [`load_line`].
pub fn attach_loaded(mut ebpf: Ebpf, program: &str, interface: &str, ns: &Netns) -> anyhow::Result<Attached> {
    // Interface names resolve in the calling thread's namespace.
    ns.run(|| {
        program_mut(&mut ebpf, program)?.attach(interface, XdpMode::Driver).map_err(anyhow::Error::from)
    })?;
    Ok(Attached { _ebpf: ebpf })
}

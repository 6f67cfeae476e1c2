//! Program `xlb` loaded (attached nowhere unless asked), its maps written
//! by the real reconciler, fed frames through BPF_PROG_TEST_RUN: the
//! data-path tests' and the benchmark's one kit.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, TestRun as _, TestRunOptions,
    programs::{Xdp, xdp::XdpLinkId},
};
use lb_common::{Counter, Event, FlowKey, Reason, flow_hash};
use xlb::{
    config::Capacities,
    control::{
        desired::{Claim, Desired, DesiredBackend, DesiredVip, Leave},
        reconcile::Reconciler,
    },
    dataplane::{BackendId, Counters as _, KernelCounters, KernelStore, Maps, loader, wire::addr_to_wire},
    model::{Forward, Protocol, VipAddr},
};

pub use xlb::dataplane::loader::Params;

use crate::{frames::LB_MAC, netns::Netns};

pub struct Plane {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    pub maps: Maps<KernelStore>,
    pub counters: KernelCounters,
    pub reconciler: Reconciler,
}

/// What one program run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// XDP action (`XDP_DROP`, `XDP_PASS`, `XDP_TX`).
    pub action: u32,
    pub frame: Vec<u8>,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The backend the control plane's table gives a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub id: BackendId,
    pub addr: IpAddr,
    /// DR: the backend's MAC.
    pub mac: Option<[u8; 6]>,
}

impl Plane {
    /// Loads program `xlb` as attached to an interface with the lab's LB MAC.
    pub fn new(params: Params) -> anyhow::Result<Plane> {
        Self::with_mac(params, LB_MAC)
    }

    /// Loads program `xlb` as attached to an interface with MAC `iface_mac`.
    pub fn with_mac(params: Params, iface_mac: [u8; 6]) -> anyhow::Result<Plane> {
        crate::require_root();
        let (ebpf, maps, counters) = loader::load_detached(params, iface_mac)?;
        Ok(Plane { ebpf, link: None, maps, counters, reconciler: Reconciler::new(params.capacities) })
    }

    /// Applies `vips` at `now`; removed backends drain for `drain_timeout`.
    pub fn apply_at(
        &mut self,
        vips: &[DesiredVip],
        drain_timeout: Duration,
        now: Instant,
    ) -> anyhow::Result<()> {
        let desired = Desired { vips: vips.to_vec(), drain_timeout };
        self.reconciler.apply(&desired, now, &mut self.maps)?;
        Ok(())
    }

    /// Applies `vips`; removed backends are freed at once.
    pub fn apply(&mut self, vips: &[DesiredVip]) -> anyhow::Result<()> {
        self.apply_at(vips, Duration::ZERO, Instant::now())
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf.program(loader::PROGRAM).expect("program xlb").try_into().expect("XDP program")
    }

    /// Attaches program `xlb` in native mode to `interface` of `ns`; it
    /// stays attached until [`Plane::detach`] or the plane is dropped.
    pub fn attach(&mut self, ns: &Netns, interface: &str) -> anyhow::Result<()> {
        let program = self.program_mut();
        let link = ns.run(|| program.attach(interface, aya::programs::XdpMode::Driver))?;
        self.link = Some(link);
        Ok(())
    }

    /// Detaches the program from the interface `attach` gave it, if any;
    /// maps and their contents stay.
    pub fn detach(&mut self) -> anyhow::Result<()> {
        if let Some(link) = self.link.take() {
            self.program_mut().detach(link)?;
        }
        Ok(())
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(loader::PROGRAM).expect("program xlb").try_into().expect("XDP program")
    }

    /// Runs one frame through the program.
    pub fn run(&self, frame: &[u8]) -> anyhow::Result<Outcome> {
        outcome(self.program(), frame, 0)
    }

    /// Runs one frame as if received on interface `ifindex` of the calling
    /// thread's network namespace, so FIB lookups see its routes.
    pub fn run_on(&self, frame: &[u8], ifindex: u32) -> anyhow::Result<Outcome> {
        outcome(self.program(), frame, ifindex)
    }

    pub fn reason(&self, reason: Reason) -> anyhow::Result<Counter> {
        Ok(self.counters.global()?.reasons[reason as usize])
    }

    pub fn event(&self, event: Event) -> anyhow::Result<u64> {
        Ok(self.counters.global()?.events[event as usize])
    }

    /// The backend the control plane's table gives `flow`.
    pub fn expected_backend(&self, flow: &FlowKey) -> Option<Expected> {
        let addr = VipAddr::try_from(&flow.vip_key()).ok()?;
        let vip = self.reconciler.vips().get(&addr)?;
        let table = vip.live_table()?;
        let id = table[(flow_hash(flow) % self.reconciler.capacities().table_size) as usize];
        let (addr, backend) = vip.backends.iter().find(|(_, b)| b.id == id)?;
        Some(Expected { id, addr: *addr, mac: backend.mac })
    }
}

/// Runs `program` once (repeat = 1) on `frame`, as received on `ifindex`
/// of the calling thread's namespace (0: none). Writes the output frame to
/// `out` and returns (action, output length, kernel-reported duration).
pub fn test_run(
    program: &Xdp,
    frame: &[u8],
    ifindex: u32,
    out: &mut [u8],
) -> anyhow::Result<(u32, usize, u64)> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let words = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut ctx = [0u8; 24];
    for (c, w) in ctx.chunks_mut(4).zip(words) {
        c.copy_from_slice(&w.to_ne_bytes());
    }
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: (ifindex != 0).then_some(&ctx[..]),
        ..TestRunOptions::default()
    })?;
    Ok((result.return_value, result.data_size_out as usize, result.duration.as_nanos() as u64))
}

/// Runs `program` once on `frame` and returns what came out.
pub fn outcome(program: &Xdp, frame: &[u8], ifindex: u32) -> anyhow::Result<Outcome> {
    let mut out = vec![0u8; frame.len() + 256];
    let (action, len, _) = test_run(program, frame, ifindex, &mut out)?;
    out.truncate(len);
    Ok(Outcome { action, frame: out })
}

/// The connection-table key of a flow from `src:sport` to `dst:dport`
/// (one family).
pub fn flow_key(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    let ((src, family), (dst, _)) = (addr_to_wire(src), addr_to_wire(dst));
    FlowKey { src, dst, sport_be: sport.to_be(), dport_be: dport.to_be(), proto, family, _pad: [0; 2] }
}

/// Parameters with no flood guard and no TUN sources.
pub fn params(capacities: Capacities) -> Params {
    Params::plain(capacities)
}

/// A backend with address `addr` and MAC 02:00:00:00:01:`tag`.
pub fn backend(addr: IpAddr, weight: u32, tag: u8) -> DesiredBackend {
    DesiredBackend { addr, weight, mac: Some(backend_mac(tag)), hop: None }
}

pub fn backend_mac(tag: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, tag]
}

/// `addrs` as backends of weight 1 with MACs 02:00:00:00:01:NN.
pub fn backends(addrs: impl IntoIterator<Item = IpAddr>) -> Vec<DesiredBackend> {
    addrs.into_iter().enumerate().map(|(i, addr)| backend(addr, 1, i as u8 + 1)).collect()
}

pub fn dr_vip(
    name: &str,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
    backends: Vec<DesiredBackend>,
) -> DesiredVip {
    DesiredVip {
        name: name.into(),
        addr: VipAddr { ip, port, protocol },
        forward: Forward::Dr,
        backends,
        leave: Leave::Drain,
        failed: Vec::new(),
        hold: false,
        claim: Claim::Listed,
        second_chance: Duration::ZERO,
    }
}

/// A TUN VIP whose backends have no resolved next hop: the data plane asks
/// the kernel's FIB for it.
pub fn tun_vip(name: &str, ip: IpAddr, port: u16, protocol: Protocol, backends: &[IpAddr]) -> DesiredVip {
    let list =
        backends.iter().map(|a| DesiredBackend { addr: *a, weight: 1, mac: None, hop: None }).collect();
    DesiredVip { forward: Forward::Tun, ..dr_vip(name, ip, port, protocol, list) }
}

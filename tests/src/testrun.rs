//! Program `xlb` loaded without attaching, fed frames through
//! BPF_PROG_TEST_RUN, its maps written by the real reconciler.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use aya::{Ebpf, TestRun as _, TestRunOptions, programs::Xdp};
use lb_common::{BackendId, Counter, Event, FlowKey, Reason, flow_hash};
use xlb::{
    dataplane::{Geometry, KernelMaps},
    loader::{self, Params},
    reconcile::{Desired, DesiredBackend, DesiredVip, Leave, Reconciler},
};

use crate::frames::LB_MAC;

pub struct Plane {
    ebpf: Ebpf,
    pub maps: KernelMaps,
    pub reconciler: Reconciler,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// XDP action (XDP_DROP = 1, XDP_PASS = 2, XDP_TX = 3).
    pub action: u32,
    pub frame: Vec<u8>,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

impl Plane {
    pub fn new(params: Params) -> anyhow::Result<Plane> {
        crate::require_root();
        let (ebpf, maps) = loader::load_detached(params, LB_MAC)?;
        Ok(Plane { ebpf, maps, reconciler: Reconciler::new(params.geometry) })
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

    fn program(&self) -> &Xdp {
        self.ebpf.program(loader::PROGRAM).expect("program xlb").try_into().expect("XDP program")
    }

    /// Runs one frame through the program.
    pub fn run(&self, frame: &[u8]) -> anyhow::Result<Outcome> {
        self.run_on(frame, 0)
    }

    /// Runs one frame as if received on interface `ifindex` of the calling
    /// thread's network namespace (0: none), so FIB lookups see its routes.
    pub fn run_on(&self, frame: &[u8], ifindex: u32) -> anyhow::Result<Outcome> {
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: Vec<u8> =
            [0, frame.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
        let result = self.program().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: (ifindex != 0).then_some(ctx.as_slice()),
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome { action: result.return_value, frame: out })
    }

    pub fn reason(&self, reason: Reason) -> anyhow::Result<Counter> {
        Ok(self.maps.global_stats()?.reasons[reason as usize])
    }

    pub fn event(&self, event: Event) -> anyhow::Result<u64> {
        Ok(self.maps.global_stats()?.events[event as usize])
    }

    /// The backend the control plane's model says `flow` goes to.
    pub fn expected_backend(&self, flow: &FlowKey) -> Option<(BackendId, [u8; 6])> {
        let vip = self.reconciler.vips().get(&flow.vip_key())?;
        let table = vip.live_table()?;
        let geometry = self.reconciler.geometry();
        let id = table[(flow_hash(flow) % geometry.table_size) as usize];
        let backend = vip.backends.values().find(|b| b.id == id)?;
        Some((id, backend.mac?))
    }
}

/// Parameters with no flood guard and no TUN sources.
pub fn params(geometry: Geometry) -> Params {
    Params {
        geometry,
        conn_insert_limit: 0,
        tun_source_v4: Ipv4Addr::UNSPECIFIED,
        tun_source_v6: Ipv6Addr::UNSPECIFIED,
    }
}

/// A backend with address `addr` and MAC 02:00:00:00:01:`tag`.
pub fn backend(addr: IpAddr, weight: u32, tag: u8) -> DesiredBackend {
    DesiredBackend { addr, weight, mac: Some(backend_mac(tag)) }
}

pub fn backend_mac(tag: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, tag]
}

pub fn dr_vip(name: &str, addr: IpAddr, port: u16, proto: u8, backends: Vec<DesiredBackend>) -> DesiredVip {
    DesiredVip {
        name: name.into(),
        key: xlb::addr::vip_key(addr, port, proto),
        mode: lb_common::MODE_DR,
        backends,
        leave: Leave::Drain,
        hold: false,
    }
}

//! Program `xlb` loaded without attaching, fed frames through
//! BPF_PROG_TEST_RUN, its maps written by the real reconciler.

use aya::{Ebpf, TestRun as _, TestRunOptions, programs::Xdp};
use lb_common::{BackendId, Counter, FlowKey, Reason, flow_hash};
use xlb::{
    dataplane::{Geometry, KernelMaps},
    loader,
    reconcile::{DesiredVip, Reconciler},
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
    pub fn new(geometry: Geometry) -> anyhow::Result<Plane> {
        crate::require_root();
        let (ebpf, maps) = loader::load_detached(geometry, LB_MAC)?;
        Ok(Plane {
            ebpf,
            maps,
            reconciler: Reconciler::new(geometry),
        })
    }

    pub fn apply(&mut self, desired: &[DesiredVip]) -> anyhow::Result<()> {
        self.reconciler.apply(desired, &mut self.maps)?;
        Ok(())
    }

    fn program(&self) -> &Xdp {
        self.ebpf
            .program(loader::PROGRAM)
            .expect("program xlb")
            .try_into()
            .expect("XDP program")
    }

    /// Runs one frame through the program.
    pub fn run(&self, frame: &[u8]) -> anyhow::Result<Outcome> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self.program().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome {
            action: result.return_value,
            frame: out,
        })
    }

    pub fn reason(&self, reason: Reason) -> anyhow::Result<Counter> {
        Ok(self.maps.reason_stats()?[reason as usize])
    }

    /// The backend the control plane's model says `flow` goes to.
    pub fn expected_backend(&self, flow: &FlowKey) -> Option<(BackendId, [u8; 6])> {
        let vip = self.reconciler.vips().get(&flow.vip_key())?;
        let table = vip.live_table()?;
        let geometry: Geometry = self.reconciler.geometry();
        let id = table[(flow_hash(flow) % geometry.table_size) as usize];
        let backend = vip.backends.values().find(|b| b.id == id)?;
        Some((id, backend.mac?))
    }
}

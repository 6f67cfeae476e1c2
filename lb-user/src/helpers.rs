//! The helper programs of object `lb-ebpf-aux` (a pass program for veth
//! peers and the benchmark's baselines), for test topologies, the demo and
//! benchmarks. `xlb` itself never attaches them.

use std::{fs::File, os::fd::AsRawFd as _, path::Path};

use aya::{
    Ebpf,
    programs::{ProgramError, Xdp, XdpMode},
};

pub static AUX_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf-aux"));

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot load the helper object")]
    Load(#[from] aya::EbpfError),
    #[error("no XDP program {0} in the helper object")]
    NoProgram(String),
    #[error("program {program}: {op} failed")]
    Program {
        program: String,
        op: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot enter network namespace {path}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Loads one helper program (for BPF_PROG_TEST_RUN, say). The program is
/// `ebpf.program_mut(name)`.
pub fn load(program: &str) -> Result<Ebpf, HelperError> {
    let mut ebpf = Ebpf::load(AUX_OBJECT)?;
    let prog: &mut Xdp = ebpf
        .program_mut(program)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| HelperError::NoProgram(program.to_owned()))?;
    prog.load().map_err(|source| HelperError::Program { program: program.to_owned(), op: "load", source })?;
    Ok(ebpf)
}

/// A helper program attached to an interface; detached on drop.
pub struct Attached {
    _ebpf: Ebpf,
}

/// Attaches helper `program` in native mode to `interface`, inside the
/// network namespace bound at `netns` (e.g. /run/netns/NAME) if given.
pub fn attach(program: &str, interface: &str, netns: Option<&Path>) -> Result<Attached, HelperError> {
    let work = || {
        let mut ebpf = load(program)?;
        let prog: &mut Xdp = ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| HelperError::NoProgram(program.to_owned()))?;
        prog.attach(interface, XdpMode::Driver).map_err(|source| HelperError::Program {
            program: program.to_owned(),
            op: "attach",
            source,
        })?;
        Ok(Attached { _ebpf: ebpf })
    };
    let Some(netns) = netns else { return work() };
    // Interface names resolve in the calling thread's namespace, so switch
    // a scratch thread there; the attachment outlives the thread.
    std::thread::scope(|s| {
        s.spawn(|| {
            let netns_err = |source| HelperError::Netns { path: netns.display().to_string(), source };
            let file = File::open(netns).map_err(netns_err)?;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(netns_err(std::io::Error::last_os_error()));
            }
            work()
        })
        .join()
        .expect("helper attach thread panicked")
    })
}

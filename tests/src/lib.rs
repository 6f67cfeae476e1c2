//! The test kit for xlb, used by the tests and by `cargo xtask bench`:
//! network namespaces and lab topologies, the daemon as a child process,
//! small servers and clients, frame builders, program `xlb` loaded for
//! BPF_PROG_TEST_RUN (`plane`), and the helper programs (`aux`). Every
//! resource is an RAII guard with a unique name, torn down on drop, so
//! tests run in parallel and leave nothing behind when they fail.

pub mod aux;
pub mod bird;
pub mod browser;
pub mod capture;
pub mod cmd;
pub mod consul_fake;
pub mod daemon;
pub mod etcd;
pub mod fleet;
pub mod flood;
pub mod frames;
pub mod http;
pub mod lab;
pub mod malformed;
pub mod netns;
pub mod plane;
pub mod servers;
pub mod sweep;
pub mod traffic;
pub mod tun_lab;

/// A process-unique id for names of namespaces, interfaces and files.
pub fn unique_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    ((std::process::id() & 0xffff) << 8) | (n & 0xff)
}

/// Sorts `samples` and says "over N changes: min …, median …, max …";
/// returns the median too.
pub fn summary(samples: &mut [std::time::Duration], what: &str) -> (String, std::time::Duration) {
    samples.sort();
    let n = samples.len();
    let median = samples[n / 2];
    let text = format!("over {n} {what}: min {:?}, median {median:?}, max {:?}", samples[0], samples[n - 1]);
    (text, median)
}

/// Fails the test early, with a clear message, when not run as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (BPF, network namespaces): run `cargo xtask test` as root");
}

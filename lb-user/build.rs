//! Builds the XDP programs (crate lb-ebpf) with nightly and bpf-linker, so
//! `xlb` can embed the object file.

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf([Package { name: "lb-ebpf", root_dir, ..Package::default() }], Toolchain::default())
}

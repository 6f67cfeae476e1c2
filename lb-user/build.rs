//! Builds the XDP programs (crate lb-ebpf) with nightly and bpf-linker, so
//! `xlb` can embed the object file.
//!
//! The helper programs' object (`lb-ebpf-aux`, for test topologies and
//! benchmarks) is built too but not embedded: its path goes to dependents'
//! build scripts (`links` metadata), so the test kit embeds it instead.

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [Package { name: "lb-ebpf", root_dir, ..Package::default() }],
        Toolchain::default(),
    )?;
    let out_dir = std::env::var("OUT_DIR")?;
    println!("cargo::metadata=aux_object={out_dir}/lb-ebpf-aux");
    Ok(())
}

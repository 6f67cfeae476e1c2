use which::which;

/// Rebuild when bpf-linker changes: it is an undeclared dependency of the
/// eBPF build (cargo cannot express binary dependencies yet).
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

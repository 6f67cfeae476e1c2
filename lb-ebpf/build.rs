use which::which;

fn main() {
    // Lets LLVM merge byte accesses into word accesses at any alignment:
    // headers are byte arrays, and without this every field of a packet or
    // map value is read and written a byte at a time. The verifier allows
    // misaligned packet and map-value access where the CPU does (x86-64,
    // arm64), but never on the stack: what lives there is aligned by type
    // (`FlowKey`, `VipKey`) or read in aligned pieces (`xmit::mac_of`).
    // Program `xlb` only: the others' stack objects are not laid out for it.
    println!("cargo:rustc-link-arg-bin=lb-ebpf=--cpu-features=+allows-misaligned-mem-access");
    // Rebuild when bpf-linker changes: it is an undeclared dependency of
    // the eBPF build (cargo cannot express binary dependencies yet).
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

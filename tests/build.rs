//! Embeds the helper programs' object, which lb-user's build script builds
//! beside the product's and names in its `links` metadata.

fn main() {
    let aux = std::env::var("DEP_XLB_EBPF_AUX_OBJECT").expect("lb-user's build script names the aux object");
    println!("cargo::rustc-env=XLB_AUX_OBJECT={aux}");
    println!("cargo::rerun-if-env-changed=DEP_XLB_EBPF_AUX_OBJECT");
}

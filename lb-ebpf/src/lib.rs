//! Code shared by xlb's XDP programs. `parse` is target-independent: it is
//! compiled into the programs and, unchanged, for the host, where tests
//! and fuzzers drive it with plain byte slices. `ptr` is packet access for
//! the BPF target.
#![cfg_attr(not(test), no_std)]

pub mod net;
pub mod parse;
#[cfg(target_arch = "bpf")]
pub mod ptr;

//! The target-independent part of xlb's data plane: frame parsing. It is
//! compiled into the XDP program and, unchanged, for the host, where tests
//! and fuzzers drive it with plain byte slices.
#![no_std]

pub mod parse;

//! The data plane's frame parser on arbitrary bytes: it must never panic
//! or read out of bounds (the sanitizer watches), every verdict must be a
//! known reason, and a parsed flow must be consistent with the frame.
#![no_main]

use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, Reason};
use lb_ebpf::parse::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    match parse(frame) {
        Ok(p) => {
            assert!(p.l3_off == 14 || p.l3_off == 18, "IP starts after Ethernet and at most one tag");
            assert!(p.l3_off + p.l3_len <= frame.len(), "the IP packet lies inside the frame");
            assert!(p.flow.family == FAMILY_V4 || p.flow.family == FAMILY_V6);
            assert!(p.flow.proto == PROTO_TCP || p.flow.proto == PROTO_UDP);
            if p.flow.family == FAMILY_V4 {
                assert!(p.flow.src[4..].iter().chain(&p.flow.dst[4..]).all(|b| *b == 0));
            }
            if p.icmp_error {
                assert_eq!(p.tcp_flags, 0);
            }
        }
        Err(reason) => assert!(Reason::ALL.contains(&reason), "unknown reason {reason:?}"),
    }
});

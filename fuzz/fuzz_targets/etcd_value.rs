//! The etcd value reader on arbitrary bytes: a reason or a record, never
//! a panic; a record is one a backend can have.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xlb::{
    config::MAX_WEIGHT,
    discovery::etcd::{MAX_VALUE, parse},
    model::Unusable,
};

fuzz_target!(|value: &[u8]| {
    if let Ok(record) = parse(value) {
        assert!(value.len() <= MAX_VALUE);
        assert!(record.weight <= MAX_WEIGHT);
        assert!(Unusable::of(record.address).is_none(), "{record:?}");
    }
});

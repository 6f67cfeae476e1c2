//! Consul's health answer decoder on arbitrary bytes: an error or
//! instances, never a panic; what it accepts keeps its own rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xlb::{
    config::{MAX_WEIGHT, consul::WarningPolicy},
    discovery::{MAX_INSTANCES, consul::decode},
    model::Unusable,
};

fuzz_target!(|body: &[u8]| {
    for (tag, policy) in [(None, WarningPolicy::Keep), (Some("edge"), WarningPolicy::Exclude)] {
        let Ok((instances, _)) = decode(body, tag, policy) else { return };
        assert!(instances.len() <= MAX_INSTANCES);
        for (i, instance) in instances.iter().enumerate() {
            assert!(instance.weight <= MAX_WEIGHT);
            assert!(Unusable::of(instance.address).is_none(), "{instance:?}");
            assert!(policy == WarningPolicy::Keep || !instance.warning);
            // One backend per address, sorted by id. An answer may list one
            // node and service ID twice with two addresses (Consul's catalog
            // never does, a lying one can): both are backends, as the
            // backend's identity is its address.
            assert!(instances[..i].iter().all(|o| o.address != instance.address && o.id <= instance.id));
        }
    }
});

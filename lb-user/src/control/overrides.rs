//! Operator overrides made through the admin API: drained backends and
//! changed weights. They sit on top of the config and discovery, survive
//! reloads, and are saved beside the state file so a restart keeps them.

use std::{collections::BTreeMap, io, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// No new flows; established ones stay (as weight 0).
    #[serde(default)]
    pub drained: bool,
    /// Replaces the configured weight.
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrides {
    /// VIP name → backend → override.
    vips: BTreeMap<String, BTreeMap<IpAddr, Override>>,
    /// `xlb announce off`: nothing is announced until `xlb announce on`.
    #[serde(default)]
    pub announce_off: bool,
}

impl Overrides {
    /// The saved overrides; none when there is no (readable) file.
    pub fn load(path: &Path) -> Result<Overrides, io::Error> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Overrides::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the file atomically, on disk before it returns.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        crate::files::write_json_atomic(path, self, crate::files::Durability::Synced)
    }

    pub fn get(&self, vip: &str, backend: IpAddr) -> Override {
        self.vips.get(vip).and_then(|b| b.get(&backend)).copied().unwrap_or_default()
    }

    /// The weight to use for a backend whose own weight is `weight`.
    pub fn weight(&self, vip: &str, backend: IpAddr, weight: u32) -> u32 {
        let o = self.get(vip, backend);
        if o.drained { 0 } else { o.weight.unwrap_or(weight) }
    }

    pub fn set(&mut self, vip: &str, backend: IpAddr, value: Override) {
        let backends = self.vips.entry(vip.to_owned()).or_default();
        if value == Override::default() {
            backends.remove(&backend);
        } else {
            backends.insert(backend, value);
        }
        self.vips.retain(|_, b| !b.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_beats_weight_and_clearing_forgets() {
        let mut o = Overrides::default();
        let a = IpAddr::from([10, 0, 0, 1]);
        assert_eq!(o.weight("web", a, 3), 3);
        o.set("web", a, Override { drained: false, weight: Some(5) });
        assert_eq!(o.weight("web", a, 3), 5);
        o.set("web", a, Override { drained: true, weight: Some(5) });
        assert_eq!(o.weight("web", a, 3), 0);
        o.set("web", a, Override::default());
        assert_eq!(o, Overrides::default());
    }

    #[test]
    fn saved_overrides_load_back() {
        let path = std::env::temp_dir().join(format!("xlb-overrides-{}.json", std::process::id()));
        let mut o = Overrides::default();
        o.set("web", IpAddr::from([10, 0, 0, 1]), Override { drained: true, weight: None });
        o.save(&path).unwrap();
        assert_eq!(Overrides::load(&path).unwrap(), o);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(Overrides::load(&path).unwrap(), Overrides::default());
    }
}

//! The daemon's files under /run/xlb: the state file `xlb status` reads
//! while the daemon is down, and the operator's overrides. Like the pinned
//! maps they do not outlive a reboot.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

pub const RUN_DIR: &str = "/run/xlb";

/// Where one data plane's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFiles {
    dir: PathBuf,
    interface: String,
}

impl RunFiles {
    pub fn new(interface: &str) -> Self {
        Self::in_dir(Path::new(RUN_DIR), interface)
    }

    pub fn in_dir(dir: &Path, interface: &str) -> Self {
        RunFiles { dir: dir.to_owned(), interface: interface.to_owned() }
    }

    /// What the daemon last published (see `observe::status`).
    pub fn state(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.interface))
    }

    /// Drains and weights set through the admin API.
    pub fn overrides(&self) -> PathBuf {
        self.dir.join(format!("{}.overrides.json", self.interface))
    }

    /// Held by the daemon that announces through routing table `table` of
    /// network namespace `netns` (its inode; each namespace has tables of
    /// its own): one table, one daemon.
    pub fn announce_lock(&self, netns: u64, table: u32) -> PathBuf {
        self.dir.join(format!("announce-{netns}-{table}.lock"))
    }

    /// Removes both, and a state file half written when its writer was
    /// killed (`xlb detach`).
    pub fn forget(&self) {
        for path in [self.state(), self.state().with_extension("json.tmp"), self.overrides()] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether a write must reach the disk before it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync before the rename: an operator's change must survive a crash.
    Synced,
    /// A cache that a restart rebuilds: no fsync.
    Cached,
}

/// Replaces `path` with `value` as JSON so that a reader sees the old file
/// or the new one, never half of either: write a sibling, rename.
pub fn write_json_atomic(path: &Path, value: &impl Serialize, durability: Durability) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(value)?)?;
    if durability == Durability::Synced {
        file.sync_all()?;
    }
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_sibling() {
        let dir = std::env::temp_dir().join(format!("xlb-files-{}", std::process::id()));
        let path = dir.join("a.json");
        write_json_atomic(&path, &[1, 2], Durability::Synced).unwrap();
        write_json_atomic(&path, &[3], Durability::Cached).unwrap();
        let back: Vec<u32> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, [3]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_are_named_for_the_interface() {
        let files = RunFiles::in_dir(Path::new("/tmp/x"), "eth0");
        assert_eq!(files.state(), Path::new("/tmp/x/eth0.json"));
        assert_eq!(files.overrides(), Path::new("/tmp/x/eth0.overrides.json"));
    }
}

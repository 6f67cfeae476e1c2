//! Small JSON files under /run/xlb that other processes read while the
//! daemon rewrites them.

use std::{io, io::Write as _, path::Path};

use serde::Serialize;

/// Replaces `path` with `value` as JSON so that a reader sees the old file
/// or the new one, never half of either: write a sibling, flush it, rename.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(value)?)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_sibling() {
        let dir = std::env::temp_dir().join(format!("xlb-files-{}", std::process::id()));
        let path = dir.join("a.json");
        write_json_atomic(&path, &[1, 2]).unwrap();
        write_json_atomic(&path, &[3]).unwrap();
        let back: Vec<u32> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, [3]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

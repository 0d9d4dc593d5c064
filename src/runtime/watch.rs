//! Noticing that files changed: the certificate pair, the verification keys, the revocation list
//! and the configuration file are all small, so their contents are compared (unlike timestamps,
//! contents never miss a quick rewrite).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often watched files are compared with what was loaded.
pub(crate) const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What some files held when they were read (`None`: unreadable or missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot(Vec<(PathBuf, Option<Vec<u8>>)>);

impl Snapshot {
    pub(crate) fn of<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Snapshot {
        Snapshot(
            paths
                .into_iter()
                .map(|p| {
                    let p = p.as_ref();
                    (p.to_path_buf(), std::fs::read(p).ok())
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_or_a_removal_is_a_change_and_rereading_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a");
        std::fs::write(&file, "one").unwrap();
        let first = Snapshot::of([&file]);
        assert_eq!(first, Snapshot::of([&file]));
        std::fs::write(&file, "two").unwrap();
        let second = Snapshot::of([&file]);
        assert_ne!(first, second);
        std::fs::remove_file(&file).unwrap();
        assert_ne!(second, Snapshot::of([&file]));
    }
}

//! Files written whole or not at all.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `contents` to `dir/name` as a file only `owner` (or this process's
/// user, when `None`) can read: a temporary file in the same directory,
/// fsync, chown, then rename. Readers see the old file or the new one, never
/// half of one; a full disk leaves the old file as it was.
pub fn write_private_atomically(
    dir: &Path,
    name: &str,
    contents: &[u8],
    owner: Option<u32>,
) -> std::io::Result<()> {
    // Named for this process: two processes writing one file (agents
    // sharing a directory) must not rename each other's halves away.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(uid))?;
        }
        std::fs::rename(&tmp, dir.join(name))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_whole_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cd-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_private_atomically(&dir, "f", b"one", None).unwrap();
        write_private_atomically(&dir, "f", b"two", None).unwrap();
        assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"two");
        let mode = std::fs::metadata(dir.join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["f"], "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

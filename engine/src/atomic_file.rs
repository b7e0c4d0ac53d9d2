//! Writing a file so that nothing is ever half-written under its final name.
//!
//! Every file Brushfire writes (images, arrays, bench tables, settings it owns, configs it
//! unpacks) goes through [`write_atomic`]: the bytes go to a temporary file in the destination's
//! own folder, are flushed to disk, and the temporary file is renamed over the destination. A
//! crash or `kill -9` at any point leaves either the old file or the new one, never a truncated
//! one, and a failed write removes its temporary file.
//!
//! A destination that is a symbolic link is written *through*: the link's target is replaced and
//! the link stays. A destination that exists but is not a regular file (a folder, a device such as
//! `/dev/full`, a FIFO, a socket) is refused with an error naming it, since renaming over it
//! would replace the device node itself (as root) instead of writing to it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{EngineError, Result};

/// How many symbolic links are followed before giving up (Linux's own limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// Writes `data` to `path` atomically; see the module documentation.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let (target, existing) = destination(path)?;
    let dir = parent_folder(&target);
    let tmp = dir.join(temporary_name(&target));
    let written =
        write_and_sync(&tmp, data, existing.as_ref()).and_then(|()| std::fs::rename(&tmp, &target));
    if let Err(e) = written {
        // Whatever failed (a full disk, a read-only folder), no temporary file stays behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(EngineError::io(&target, e));
    }
    sync_folder(&dir);
    Ok(())
}

/// Checks, without writing it, that [`write_atomic`] could write `path`: the symbolic links
/// followed, the destination absent or a regular file, its folder present and writable (a file
/// is created there and removed). Returns the file that would be written. For refusing an output
/// before hours of work rather than after.
pub fn check_writable(path: &Path) -> Result<PathBuf> {
    let (target, _) = destination(path)?;
    let dir = parent_folder(&target);
    let probe = dir.join(temporary_name(&target));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| EngineError::io(&dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(target)
}

/// The file `path` finally names and, when it exists, its metadata; an error when it is not a
/// regular file or its folder is missing.
fn destination(path: &Path) -> Result<(PathBuf, Option<std::fs::Metadata>)> {
    let target = resolve_symlinks(path)?;
    let existing = match std::fs::metadata(&target) {
        Ok(meta) if meta.is_file() => Some(meta),
        Ok(meta) => {
            return Err(EngineError::NotARegularFile {
                path: target,
                kind: file_kind(&meta),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(EngineError::io(&target, e)),
    };
    let dir = parent_folder(&target);
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok((target, existing)),
        Ok(_) => Err(EngineError::io(
            &dir,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a folder"),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(EngineError::io(
            &dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
        )),
        Err(e) => Err(EngineError::io(&dir, e)),
    }
}

/// Writes `data` to `path` atomically like [`write_atomic`], but only if nothing is there yet:
/// an existing file (or link, or anything else) under that name is never replaced, even by
/// another process racing for the same name, and gives an `AlreadyExists` I/O error. The complete
/// file appears under its name at once (a hard link from the synced temporary file), or not at
/// all.
pub fn write_atomic_new(path: &Path, data: &[u8]) -> Result<()> {
    let dir = parent_folder(path);
    let tmp = dir.join(temporary_name(path));
    let written = write_and_sync(&tmp, data, None).and_then(|()| {
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
            // A file system without hard links (FAT, some network shares): check, then rename.
            Err(_) if std::fs::symlink_metadata(path).is_ok() => Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file of that name exists",
            )),
            Err(_) => std::fs::rename(&tmp, path),
        }
    });
    let _ = std::fs::remove_file(&tmp);
    written.map_err(|e| EngineError::io(path, e))?;
    sync_folder(&dir);
    Ok(())
}

/// The file `path` finally names: symbolic links followed, relative targets taken from the
/// link's folder; a dangling link gives its (missing) target, which is then created.
pub fn resolve_symlinks(path: &Path) -> Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_SYMLINK_HOPS {
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link =
                    std::fs::read_link(&current).map_err(|e| EngineError::io(&current, e))?;
                current = parent_folder(&current).join(link);
            }
            _ => return Ok(current),
        }
    }
    Err(EngineError::io(
        path,
        std::io::Error::other(format!(
            "more than {MAX_SYMLINK_HOPS} symbolic links to follow (a loop?)"
        )),
    ))
}

/// What kind of thing `meta` describes, for an error message.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// The folder `path` is in (`.` for a bare file name).
fn parent_folder(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// `.NAME.PID.N.tmp`: hidden, and unique per process and call, so two threads writing the same
/// destination never share a temporary file.
fn temporary_name(target: &Path) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{name}.{}.{n}.tmp", std::process::id())
}

/// Creates `tmp` (never an existing file or link), writes `data`, keeps the permissions of the
/// file it will replace, and flushes it to disk.
fn write_and_sync(
    tmp: &Path,
    data: &[u8],
    replacing: Option<&std::fs::Metadata>,
) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)?;
    file.write_all(data)?;
    if let Some(meta) = replacing {
        file.set_permissions(meta.permissions())?;
    }
    file.sync_all()
}

/// Makes the rename itself durable where the platform allows (best effort: some file systems
/// refuse to sync a folder, and the data is already safe under one name or the other).
fn sync_folder(dir: &Path) {
    #[cfg(unix)]
    if let Ok(folder) = std::fs::File::open(dir) {
        let _ = folder.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("brushfire-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn writes_and_replaces_a_regular_file() {
        let dir = scratch("plain");
        let path = dir.join("a.txt");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(leftovers(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_file_never_replaces_one_that_exists() {
        let dir = scratch("new");
        let path = dir.join("00001-1-0.png");
        write_atomic_new(&path, b"first").unwrap();
        let EngineError::Io { error, .. } = write_atomic_new(&path, b"second").unwrap_err() else {
            panic!("an I/O error")
        };
        assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert!(leftovers(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn keeps_the_permissions_of_the_file_it_replaces() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("perm");
        let path = dir.join("a.txt");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, b"new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn writes_through_a_symlink_and_keeps_it() {
        let dir = scratch("link");
        let real = dir.join("real.png");
        std::fs::write(&real, b"old").unwrap();
        let link = dir.join("link.png");
        std::os::unix::fs::symlink("real.png", &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        // A dangling link creates its target.
        let dangling = dir.join("dangling.png");
        std::os::unix::fs::symlink("made.png", &dangling).unwrap();
        write_atomic(&dangling, b"made").unwrap();
        assert_eq!(std::fs::read(dir.join("made.png")).unwrap(), b"made");
        assert!(
            std::fs::symlink_metadata(&dangling)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // A loop is an error, not a hang.
        let a = dir.join("loop-a");
        std::os::unix::fs::symlink("loop-b", &a).unwrap();
        std::os::unix::fs::symlink("loop-a", dir.join("loop-b")).unwrap();
        let err = write_atomic(&a, b"x").unwrap_err().to_string();
        assert!(err.contains("symbolic links"), "{err}");
        assert!(leftovers(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let dir = scratch("special");
        let err = write_atomic(&dir, b"x").unwrap_err().to_string();
        assert!(err.contains("is a folder"), "{err}");
        // A device node is refused by looking at it; nothing is written to it.
        let err = write_atomic(Path::new("/dev/null"), b"x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/dev/null") && err.contains("character device"),
            "{err}"
        );
        assert!(
            !std::fs::metadata("/dev/null")
                .unwrap()
                .file_type()
                .is_file(),
            "/dev/null is still a device"
        );
        // A FIFO: opening it for writing would block with no reader; it is refused up front.
        let fifo = dir.join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.map(|s| s.success()).unwrap_or(false) {
            let err = write_atomic(&fifo, b"x").unwrap_err().to_string();
            assert!(err.contains("FIFO"), "{err}");
        }
        // A missing folder is named.
        let err = write_atomic(&dir.join("missing/a.png"), b"x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
        assert!(leftovers(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

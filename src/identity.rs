//! The relay's identity key: its only state.
//!
//! Format: libp2p's protobuf key encoding (`Keypair::to_protobuf_encoding`), the format
//! the original relay wrote. A key is written atomically (an unnamed `O_TMPFILE` in the
//! same directory, or where the file system has none a named temporary file, fsync,
//! hard link into place, fsync of the directory) with mode 0600, and an existing file is
//! never replaced: an unreadable or corrupt key is reported, not regenerated, because
//! regenerating would silently change the relay's peer ID. A crash while writing leaves
//! nothing behind with `O_TMPFILE`; named temporary files of processes that are gone are
//! removed at the next start.
//!
//! Only a regular file of at most [`MAX_KEY_FILE_BYTES`] is read: a device, a FIFO or a
//! huge file given by mistake is an error, not a hang or an out-of-memory.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The largest key file read. An ED25519 key in libp2p's encoding is 68 bytes; other
/// key types the encoding allows (RSA) are a few KiB.
pub const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

use libp2p::identity::Keypair;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity key {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("identity key {path} is a symbolic link to {target}, which does not exist")]
    DanglingSymlink { path: PathBuf, target: PathBuf },
    #[error("cannot read identity key {path}: it is {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "identity key {path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key (refusing to overwrite it)"
    )]
    TooLarge { path: PathBuf },
    #[error(
        "identity key {path} is empty; refusing to overwrite it (move it away to generate a new key)"
    )]
    Empty { path: PathBuf },
    #[error(
        "identity key {path} is not a valid libp2p protobuf-encoded key (refusing to overwrite it)"
    )]
    Corrupt {
        path: PathBuf,
        source: libp2p::identity::DecodingError,
    },
    #[error("cannot create directory {path} for the identity key")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write identity key {path}")]
    Write { path: PathBuf, source: io::Error },
}

/// How a key was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Loaded,
    Generated,
}

/// Load the key at `path`, or generate an ED25519 key and save it there if no file exists.
pub fn load_or_generate(path: &Path) -> Result<(Keypair, KeySource), IdentityError> {
    match load(path) {
        Ok(key) => Ok((key, KeySource::Loaded)),
        Err(IdentityError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            if let Ok(target) = fs::read_link(path) {
                return Err(IdentityError::DanglingSymlink {
                    path: path.to_owned(),
                    target,
                });
            }
            remove_stale_temp_files(path);
            let key = Keypair::generate_ed25519();
            match save_new(path, &key) {
                Ok(()) => Ok((key, KeySource::Generated)),
                // Another process created it between our read and write: use theirs.
                Err(IdentityError::Write { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    Ok((load(path)?, KeySource::Loaded))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Load an existing key.
pub fn load(path: &Path) -> Result<Keypair, IdentityError> {
    let read_err = |source| IdentityError::Read {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer; the type check follows.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    let ty = file.metadata().map_err(read_err)?.file_type();
    if !ty.is_file() {
        let kind = if ty.is_dir() {
            "a directory"
        } else if ty.is_fifo() {
            "a FIFO"
        } else if ty.is_char_device() {
            "a character device"
        } else if ty.is_block_device() {
            "a block device"
        } else if ty.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(IdentityError::NotAFile {
            path: path.to_owned(),
            kind,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(IdentityError::TooLarge {
            path: path.to_owned(),
        });
    }
    if bytes.is_empty() {
        return Err(IdentityError::Empty {
            path: path.to_owned(),
        });
    }
    Keypair::from_protobuf_encoding(&bytes).map_err(|source| IdentityError::Corrupt {
        path: path.to_owned(),
        source,
    })
}

/// The key file's mode if users other than its owner can read or write it.
pub fn loose_permissions(path: &Path) -> Option<u32> {
    let mode = fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The prefix of the named temporary files of `path`: `.<file name>.tmp-`.
fn temp_prefix(path: &Path) -> Option<String> {
    Some(format!(".{}.tmp-", path.file_name()?.to_str()?))
}

/// Remove temporary files of `path` left by a process that died while writing it
/// (`.<name>.tmp-<pid>-<random>`, where no process `<pid>` runs any more). They hold
/// private key bytes.
fn remove_stale_temp_files(path: &Path) {
    let Some(prefix) = temp_prefix(path) else {
        return;
    };
    let Ok(entries) = fs::read_dir(dir_of(path)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            match fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(
                    file = %entry.path().display(),
                    "removed a temporary key file left by a process that died while writing it"
                ),
                Err(e) => tracing::warn!(
                    file = %entry.path().display(),
                    "cannot remove a stale temporary key file: {e}"
                ),
            }
        }
    }
}

/// Write `key` to `path`, which must not exist yet.
///
/// The key goes to a temporary file in the same directory, is fsynced, and is then
/// hard-linked to `path`, which fails rather than replaces if `path` appeared meanwhile.
pub fn save_new(path: &Path, key: &Keypair) -> Result<(), IdentityError> {
    let write_err = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    let encoded = key
        .to_protobuf_encoding()
        .map_err(|e| write_err(io::Error::other(e)))?;

    let dir = dir_of(path);
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| IdentityError::CreateDir {
            path: dir.clone(),
            source,
        })?;

    // An unnamed file first: if the process dies before the link, nothing is left.
    match OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(&dir)
    {
        Ok(mut file) => {
            let result = (|| {
                file.write_all(&encoded)?;
                file.sync_all()?;
                let fd = format!("/proc/self/fd/{}", file.as_raw_fd());
                nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    fd.as_str(),
                    nix::fcntl::AT_FDCWD,
                    path,
                    nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
                )
                .map_err(io::Error::from)?;
                File::open(&dir)?.sync_all()
            })();
            return result.map_err(write_err);
        }
        // No O_TMPFILE on this file system (or kernel): a named file.
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOENT)
            ) =>
        {
            return Err(write_err(e));
        }
        Err(_) => {}
    }

    let prefix = temp_prefix(path)
        .ok_or_else(|| write_err(io::Error::other("path has no UTF-8 file name")))?;
    let tmp = dir.join(format!(
        "{prefix}{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&encoded)?;
        file.sync_all()?;
        drop(file);
        fs::hard_link(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "privstack-identity-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn generates_then_loads_the_same_key() {
        let dir = tempdir();
        let path = dir.join("sub/dir/key");
        let (a, src_a) = load_or_generate(&path).unwrap();
        let (b, src_b) = load_or_generate(&path).unwrap();
        assert_eq!(src_a, KeySource::Generated);
        assert_eq!(src_b, KeySource::Loaded);
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("key")]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_truncated_and_empty_files_are_errors_and_untouched() {
        let dir = tempdir();
        let valid = Keypair::generate_ed25519().to_protobuf_encoding().unwrap();
        let cases: [(&str, Vec<u8>); 3] = [
            ("empty", vec![]),
            ("truncated", valid[..valid.len() / 2].to_vec()),
            ("garbage", b"not a key at all\n".to_vec()),
        ];
        for (name, bytes) in cases {
            let path = dir.join(name);
            fs::write(&path, &bytes).unwrap();
            let err = load_or_generate(&path).unwrap_err();
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
            assert_eq!(fs::read(&path).unwrap(), bytes, "{name} was modified");
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempdir();
        // A character device and a FIFO: an error at once, not 450 MiB/s or a hang.
        let e = load_or_generate(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let fifo = dir.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let e = load_or_generate(&fifo).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = load_or_generate(&dir).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let big = dir.join("big");
        let bytes = vec![7u8; 1 << 20];
        fs::write(&big, &bytes).unwrap();
        let e = load_or_generate(&big).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        assert_eq!(fs::read(&big).unwrap(), bytes);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_dangling_symlink_says_what_it_is() {
        let dir = tempdir();
        let link = dir.join("key");
        let target = dir.join("elsewhere/relay.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = load_or_generate(&link).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("symbolic link") && msg.contains(&*target.to_string_lossy()),
            "{msg}"
        );
        assert!(!target.exists() && fs::symlink_metadata(&link).is_ok());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn temporary_files_of_dead_writers_are_removed() {
        let dir = tempdir();
        let path = dir.join("relay.key");
        // No process has this PID (Linux PIDs stay below 2^22).
        let stale = dir.join(".relay.key.tmp-99999999-0badcafe");
        let other_key = dir.join(".other.key.tmp-99999999-0badcafe");
        let live = dir.join(format!(".relay.key.tmp-{}-00000001", std::process::id()));
        for f in [&stale, &other_key, &live] {
            fs::write(f, b"private key bytes").unwrap();
        }
        load_or_generate(&path).unwrap();
        assert!(!stale.exists(), "a dead writer's temporary file is removed");
        assert!(other_key.exists() && live.exists(), "others are left alone");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn save_new_never_replaces_an_existing_file() {
        let dir = tempdir();
        let path = dir.join("key");
        fs::write(&path, b"precious").unwrap();
        let err = save_new(&path, &Keypair::generate_ed25519()).unwrap_err();
        assert!(matches!(err, IdentityError::Write { .. }));
        assert_eq!(fs::read(&path).unwrap(), b"precious");
        fs::remove_dir_all(dir).unwrap();
    }
}

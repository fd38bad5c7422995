//! The relay's identity key: its only state.
//!
//! Format: libp2p's protobuf key encoding (`Keypair::to_protobuf_encoding`), the format
//! the original relay wrote. A key is written atomically (temporary file in the same
//! directory, fsync, hard link into place, fsync of the directory) with mode 0600, and an
//! existing file is never replaced: an unreadable or corrupt key is reported, not
//! regenerated, because regenerating would silently change the relay's peer ID.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity key {path}")]
    Read { path: PathBuf, source: io::Error },
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
    let bytes = fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(IdentityError::Empty {
            path: path.to_owned(),
        });
    }
    let key = Keypair::from_protobuf_encoding(&bytes).map_err(|source| IdentityError::Corrupt {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "identity key is readable by other users; chmod 600 it"
            );
        }
    }
    Ok(key)
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

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| IdentityError::CreateDir {
            path: dir.clone(),
            source,
        })?;

    let file_name = path
        .file_name()
        .ok_or_else(|| write_err(io::Error::other("path has no file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let tmp = dir.join(tmp_name);

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

//! Reading the files the configuration names: every one within [`MAX_FILE_BYTES`], measured
//! on the opened file before any of it is read ([`read_capped`]); and secrets (root keys,
//! PINs, credentials), which pass these checks too:
//!
//! - opened once and without blocking, so a FIFO or a device cannot hang start-up, and every
//!   check is made on the opened file: the file checked is the file read;
//! - a regular file, owned by the plugin's user or by root, and readable by the plugin's user
//!   (this process's, or `check --as-user`'s: [`crate::identity`]);
//! - its mode denies the bits the caller names (group and others, for a root key);
//! - the directory it is in (and the directory of the file a symlink points to), and every
//!   directory above, is owned by that user or root, not writable by group or others, who
//!   could otherwise swap the file or a directory on its path, and enterable by that user
//!   (a sticky directory, such as the root of a kubelet Secret or projected volume, is fine:
//!   there others cannot rename or remove what they do not own);
//! - no larger than the caller's bound (checked on the opened file before reading), then read
//!   whole into a zeroizing buffer, the read stopping one byte past the bound.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::identity::{self, Identity, describe};

/// Largest config file, and largest file it names, that is read at all (root keys, PINs,
/// tokens and certificates are far smaller): a bigger one is refused from its size alone, so a
/// stray or hostile huge file cannot fill memory or stall the plugin while it is read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why `path`, of `len` bytes, is refused: it names the file, its size and the cap.
pub fn too_large(what: &str, path: &Path, len: u64) -> String {
    format!(
        "{what} {} is {len} bytes, over the limit of {MAX_FILE_BYTES} bytes (1 MiB) for the config file and every file it names",
        path.display(),
    )
}

/// Opens `path` for reading without blocking (a FIFO or a device cannot hang the open) and
/// takes its metadata from the opened file, so the file measured is the file read.
pub fn open_nonblocking(path: &Path) -> std::io::Result<(File, fs::Metadata)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}

/// Reads `path`, the config file or a file it names that is not a secret (a CA or certificate
/// PEM); errors start with `what` and the path. It must be a regular file of at most
/// [`MAX_FILE_BYTES`], measured before any of it is read; the read stops one byte past the
/// cap, so a file that grows meanwhile is refused too.
pub fn read_capped(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    let err = |why: &dyn std::fmt::Display| format!("{what} {}: {why}", path.display());
    let (file, meta) = open_nonblocking(path).map_err(|e| err(&e))?;
    if meta.is_dir() {
        return Err(err(&"is a directory"));
    }
    if !meta.is_file() {
        return Err(err(&"is not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large(what, path, meta.len()));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize + 1);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| err(&e))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(err(&format_args!(
            "grew past the limit of {MAX_FILE_BYTES} bytes while it was read"
        )));
    }
    Ok(buf)
}

/// What a caller requires of its secret file.
pub struct Policy {
    /// Permission bits that must be clear (0o077: no group or other access).
    pub deny_mode: u32,
    /// Largest file accepted, in bytes.
    pub max_len: u64,
}

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} has mode {mode:o}: it must not be readable or writable by {who}; fix: chmod {fix:o} {path}")]
    TooOpen {
        path: PathBuf,
        mode: u32,
        who: &'static str,
        fix: u32,
    },
    #[error(
        "{path} is owned by uid {uid}: it must be owned by the plugin's user (uid {me}) or root; fix: chown {me} {path}{hint}"
    )]
    WrongOwner {
        path: PathBuf,
        uid: u32,
        me: u32,
        hint: String,
    },
    #[error(
        "{path} (mode {mode:o}, uid {uid}, gid {gid}) cannot be read by the plugin's user (uid {me}); fix: chown {me} {path}"
    )]
    NotReadable {
        path: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
        me: u32,
    },
    /// `why` names the directory, the cause and the fix.
    #[error("{path}: directory {why}")]
    UnsafeDirectory { path: PathBuf, why: String },
    #[error("{path} is {len} bytes, over the limit of {max} bytes")]
    TooLong { path: PathBuf, len: u64, max: u64 },
    #[error("{path} grew past the limit of {max} bytes while it was read")]
    Grew { path: PathBuf, max: u64 },
}

/// Opens, checks and reads `path` under `policy`.
pub fn read(path: &Path, policy: &Policy) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    let (file, meta) = open(path, policy)?;
    let max = policy.max_len.min(MAX_FILE_BYTES);
    // Measured on the opened file, before reading any of it; the bounded read below still
    // catches a file that grows meanwhile.
    if meta.len() > max {
        return Err(SecretFileError::TooLong {
            path: path.to_owned(),
            len: meta.len(),
            max,
        });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|source| io(path, source))?;
    if buf.len() as u64 > max {
        return Err(SecretFileError::Grew {
            path: path.to_owned(),
            max,
        });
    }
    Ok(buf)
}

/// Opens `path` without blocking and runs every check on the opened file.
pub fn open(path: &Path, policy: &Policy) -> Result<(File, fs::Metadata), SecretFileError> {
    let (file, meta) = open_nonblocking(path).map_err(|source| io(path, source))?;
    if !meta.is_file() {
        return Err(SecretFileError::NotAFile { path: path.to_owned() });
    }
    if meta.mode() & policy.deny_mode != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
            who: if policy.deny_mode & 0o070 != 0 {
                "group or others"
            } else {
                "others"
            },
            fix: meta.mode() & 0o777 & !policy.deny_mode,
        });
    }
    let id = identity::current();
    let me = id.uid;
    if meta.uid() != me && meta.uid() != 0 {
        return Err(SecretFileError::WrongOwner {
            path: path.to_owned(),
            uid: meta.uid(),
            me,
            hint: identity::root_hint(meta.uid()),
        });
    }
    // Only ever false under `check --as-user`: this process opened it, as its own user.
    if !identity::may(id, &meta, identity::READ) {
        return Err(SecretFileError::NotReadable {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            me,
        });
    }
    let real = fs::canonicalize(path).map_err(|source| io(path, source))?;
    let given_dir = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned));
    for dir in [given_dir, real.parent().map(Path::to_owned)].into_iter().flatten() {
        check_directory(path, &dir, id)?;
    }
    Ok((file, meta))
}

fn check_directory(path: &Path, dir: &Path, id: Identity) -> Result<(), SecretFileError> {
    unsafe_ancestor(dir, id)
        .map_err(|source| io(dir, source))?
        .map_or(Ok(()), |why| {
            Err(SecretFileError::UnsafeDirectory {
                path: path.to_owned(),
                why,
            })
        })
}

/// What is wrong with the first of `dir` and its ancestors (symlinks resolved) that `id`
/// cannot enter, or that another user could use to replace what is below it: writable by
/// group or others without the sticky bit, or owned by neither `id` nor root. The answer names
/// the directory, the cause and the fix.
pub fn unsafe_ancestor(dir: &Path, id: Identity) -> std::io::Result<Option<String>> {
    let real = fs::canonicalize(dir)?;
    for (depth, ancestor) in real.ancestors().enumerate() {
        let meta = fs::metadata(ancestor)?;
        // The file's own directory may belong to the plugin's user; above it, root.
        let fix_owner = if depth == 0 { id.uid } else { 0 };
        if let Some(why) = identity::unsafe_directory(ancestor, &meta, id, fix_owner, true) {
            return Ok(Some(why));
        }
        if !identity::may(id, &meta, identity::SEARCH) {
            // The one class of bits that applies to this user: owner, else group, else others.
            let class = if meta.uid() == id.uid {
                "u"
            } else if id.gid == Some(meta.gid()) {
                "g"
            } else {
                "o"
            };
            return Ok(Some(format!(
                "{} (mode {:o}, uid {}, gid {}) cannot be entered by the plugin's user ({}); fix: chmod {class}+x {}",
                ancestor.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                describe(id),
                ancestor.display(),
            )));
        }
    }
    Ok(None)
}

fn io(path: &Path, source: std::io::Error) -> SecretFileError {
    SecretFileError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KEY: Policy = Policy {
        deny_mode: 0o077,
        max_len: 64,
    };

    #[test]
    fn refuses_what_others_could_read_swap_or_block_on() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, b"secret").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&read(&p, &KEY).unwrap()[..], b"secret");

        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read(&p, &KEY),
            Err(SecretFileError::TooOpen { mode: 0o640, .. })
        ));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();

        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = read(&p, &KEY).unwrap_err();
        assert!(matches!(e, SecretFileError::UnsafeDirectory { .. }), "{e}");
        // Sticky (a kubelet volume's root): others cannot replace our file there.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(read(&p, &KEY).is_ok());
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();

        // An unsafe directory higher up is as bad: it could be renamed away.
        let nested = dir.path().join("a/b");
        fs::create_dir_all(&nested).unwrap();
        let deep = nested.join("k");
        fs::write(&deep, b"x").unwrap();
        fs::set_permissions(&deep, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(dir.path().join("a"), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            read(&deep, &KEY),
            Err(SecretFileError::UnsafeDirectory { .. })
        ));
        fs::set_permissions(dir.path().join("a"), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(read(&deep, &KEY).is_ok());

        // A symlink from a safe directory into an unsafe one is refused too.
        let open_dir = dir.path().join("open");
        fs::create_dir(&open_dir).unwrap();
        fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o733)).unwrap();
        let target = open_dir.join("k");
        fs::write(&target, b"x").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            read(&link, &KEY),
            Err(SecretFileError::UnsafeDirectory { .. })
        ));

        fs::write(&p, [1u8; 65]).unwrap();
        assert!(matches!(read(&p, &KEY), Err(SecretFileError::TooLong { len: 65, .. })));

        // A FIFO is refused at once instead of blocking the open.
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(read(&fifo, &KEY), Err(SecretFileError::NotAFile { .. })));
        assert!(matches!(read(dir.path(), &KEY), Err(SecretFileError::NotAFile { .. })));
    }

    #[test]
    fn read_capped_refuses_a_file_over_the_cap_from_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        let file = File::create(&p).unwrap();
        file.set_len(MAX_FILE_BYTES).unwrap();
        assert_eq!(read_capped("ca_file", &p).unwrap().len() as u64, MAX_FILE_BYTES);
        // Sparse: 300 MiB here is no disk and, refused from its size, no memory either.
        file.set_len(300 << 20).unwrap();
        let e = read_capped("ca_file", &p).unwrap_err();
        assert!(
            e.contains(&format!(
                "ca_file {} is {} bytes, over the limit",
                p.display(),
                300u64 << 20
            )),
            "{e}"
        );
        assert!(
            read_capped("ca_file", dir.path())
                .unwrap_err()
                .contains("is a directory")
        );
    }
}

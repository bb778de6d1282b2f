//! The Unix socket the apiserver dials: creation, permissions, stale-socket handling, removal.
//!
//! Rules: a missing parent directory is created 0750; an existing parent directory must be
//! owned by the plugin's user ([`crate::identity`]) or root, writable by it and not by group or others (who could unlink the socket
//! and bind their own in its place, and receive the apiserver's seeds); an existing path that is
//! a socket nobody answers on is stale and replaced; a live socket or a non-socket path stops
//! start-up and is left untouched. Abstract sockets (`@name`) have no file and no permissions: any process in
//! the network namespace can connect, so prefer a path on a shared host.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io::{self, ErrorKind};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A socket address as written in config: `/abs/path`, `unix:///abs/path`, `@name`, `unix:///@name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    Path(PathBuf),
    Abstract(String),
}

impl FromStr for SocketAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.strip_prefix("unix://").unwrap_or(s);
        let s = s
            .strip_prefix("/@")
            .map(|n| format!("@{n}"))
            .unwrap_or_else(|| s.to_string());
        if let Some(name) = s.strip_prefix('@') {
            if name.is_empty() || name.len() > 100 {
                return Err("abstract socket name must be 1..=100 bytes".into());
            }
            return Ok(Self::Abstract(name.to_string()));
        }
        let path = PathBuf::from(&s);
        if !path.is_absolute() || path.file_name().is_none() {
            return Err(format!("{s:?} is not an absolute socket path"));
        }
        if s.len() > 107 {
            return Err(format!("socket path {s:?} is longer than the 107-byte limit"));
        }
        Ok(Self::Path(path))
    }
}

impl fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Abstract(n) => write!(f, "@{n}"),
        }
    }
}

impl SocketAddress {
    fn std_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Path(p) => SocketAddr::from_pathname(p),
            Self::Abstract(n) => SocketAddr::from_abstract_name(n.as_bytes()),
        }
    }

    /// Connects (blocking) to the address; used for liveness checks and by clients.
    pub fn connect_std(&self) -> io::Result<UnixStream> {
        UnixStream::connect_addr(&self.std_addr()?)
    }
}

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another server is already listening on {0}; refusing to start")]
    InUse(SocketAddress),
    #[error("{0} exists and is not a socket; refusing to touch it")]
    NotASocket(PathBuf),
    #[error("socket {addr}: {what}: {source}")]
    Io {
        addr: SocketAddress,
        what: &'static str,
        source: io::Error,
    },
    #[error("socket group {0:?} not found in /etc/group")]
    UnknownGroup(String),
    /// `why` names the directory, the cause (owner or mode) and the fix.
    #[error("socket directory {why}")]
    UnsafeDirectory { why: String },
}

/// Checks what can be checked before binding (for `kms-plugin check`): the group exists and
/// the socket's directory, if it exists, is safe. `private_to_pod`
/// (`socket.directory_private_to_pod`) lets its own directory be writable by others.
pub fn preflight(address: &SocketAddress, group: Option<&str>, private_to_pod: bool) -> Result<(), SocketError> {
    group.map(resolve_group).transpose()?;
    if let SocketAddress::Path(path) = address
        && let Some(parent) = path.parent().filter(|p| p.exists())
    {
        check_directory(address, parent, private_to_pod)?;
    }
    Ok(())
}

fn check_directory(address: &SocketAddress, dir: &Path, private_to_pod: bool) -> Result<(), SocketError> {
    let io = |source| SocketError::Io {
        addr: address.clone(),
        what: "stat parent directory",
        source,
    };
    let meta = fs::metadata(dir).map_err(io)?;
    // The plugin's user: this process's, or `check --as-user`'s.
    let id = crate::identity::current();
    // The socket's own directory: not even sticky (others could bind the name first), unless
    // the operator says only the pod's containers can reach it; its owner is checked either way.
    let unsafe_dir = if private_to_pod {
        crate::identity::unsafe_owner(dir, &meta, id, id.uid)
    } else {
        crate::identity::unsafe_directory(dir, &meta, id, id.uid, false)
    };
    if let Some(why) = unsafe_dir {
        return Err(SocketError::UnsafeDirectory { why });
    }
    if !crate::identity::may(id, &meta, crate::identity::WRITE | crate::identity::SEARCH) {
        return Err(SocketError::UnsafeDirectory {
            why: format!(
                "{} (mode {:o}, uid {}, gid {}) does not let the plugin's user (uid {}) create its socket there; fix: chown {} {}",
                dir.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                id.uid,
                id.uid,
                dir.display(),
            ),
        });
    }
    // Above it, nothing another user could rename away and replace (the walk starts at the
    // directory itself, already judged above when it is the pod's).
    let real = fs::canonicalize(dir).map_err(io)?;
    let walk_from = if private_to_pod {
        real.parent()
    } else {
        Some(real.as_path())
    };
    if let Some(from) = walk_from
        && let Some(why) = crate::secret_file::unsafe_ancestor(from, id).map_err(io)?
    {
        return Err(SocketError::UnsafeDirectory { why });
    }
    Ok(())
}

/// Removes the socket file when dropped (after the server has stopped).
pub struct SocketGuard {
    address: SocketAddress,
    /// (device, inode) of the socket this process bound.
    identity: Option<(u64, u64)>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let (SocketAddress::Path(p), Some(identity)) = (&self.address, self.identity) {
            // Only remove the very socket we bound: never a file someone put in its place, nor
            // the socket of a successor that started during our grace period.
            if fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == identity) {
                let _ = fs::remove_file(p);
            }
        }
    }
}

/// Binds `address` following the rules above (`private_to_pod`: see [`preflight`]). Must run
/// inside a tokio runtime.
pub fn bind(
    address: &SocketAddress,
    mode: u32,
    group: Option<&str>,
    private_to_pod: bool,
) -> Result<(tokio::net::UnixListener, SocketGuard), SocketError> {
    let io_err = |what: &'static str| {
        let addr = address.clone();
        move |source| SocketError::Io { addr, what, source }
    };
    let gid = group.map(resolve_group).transpose()?;
    let mut identity = None;
    let std_listener = match address {
        SocketAddress::Abstract(_) => UnixListener::bind_addr(&address.std_addr().map_err(io_err("address"))?)
            .map_err(|e| {
                if e.kind() == ErrorKind::AddrInUse {
                    SocketError::InUse(address.clone())
                } else {
                    io_err("bind")(e)
                }
            })?,
        SocketAddress::Path(path) => {
            prepare_path(address, path, private_to_pod)?;
            // The socket is created with its final mode (umask), so there is no window in which
            // others could connect before a chmod; and nothing follows a symlink afterwards.
            let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(!mode & 0o777));
            let bound = UnixListener::bind(path);
            rustix::process::umask(old);
            let l = bound.map_err(io_err("bind"))?;
            if let Some(gid) = gid {
                std::os::unix::fs::lchown(path, None, Some(gid)).map_err(io_err("chown"))?;
            }
            let meta = fs::symlink_metadata(path).map_err(io_err("stat"))?;
            identity = Some((meta.dev(), meta.ino()));
            l
        }
    };
    std_listener.set_nonblocking(true).map_err(io_err("set_nonblocking"))?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(io_err("register"))?;
    if let SocketAddress::Abstract(_) = address {
        tracing::warn!(socket = %address, "abstract sockets have no file permissions: any process in this network namespace can connect; set socket.allowed_uids");
    }
    Ok((
        listener,
        SocketGuard {
            address: address.clone(),
            identity,
        },
    ))
}

fn prepare_path(address: &SocketAddress, path: &Path, private_to_pod: bool) -> Result<(), SocketError> {
    let io_err = |what: &'static str| {
        let addr = address.clone();
        move |source| SocketError::Io { addr, what, source }
    };
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(parent)
                .map_err(io_err("create parent directory"))?;
        }
        check_directory(address, parent, private_to_pod)?;
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat")(e)),
        Ok(m) if !m.file_type().is_socket() => Err(SocketError::NotASocket(path.to_owned())),
        Ok(_) => match address.connect_std() {
            Ok(_) => Err(SocketError::InUse(address.clone())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tracing::warn!(socket = %address, "removing stale socket left by an earlier run");
                fs::remove_file(path).map_err(io_err("remove stale socket"))
            }
            Err(e) => Err(io_err("probe existing socket")(e)),
        },
    }
}

/// A numeric gid, or a group name looked up in /etc/group.
fn resolve_group(group: &str) -> Result<u32, SocketError> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    fs::read_to_string("/etc/group")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut f = line.split(':');
                (f.next() == Some(group)).then(|| f.nth(1)?.parse().ok())?
            })
        })
        .ok_or_else(|| SocketError::UnknownGroup(group.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let p = |s: &str| s.parse::<SocketAddress>();
        assert_eq!(p("/run/k.sock"), Ok(SocketAddress::Path("/run/k.sock".into())));
        assert_eq!(p("unix:///run/k.sock"), Ok(SocketAddress::Path("/run/k.sock".into())));
        assert_eq!(p("@kms"), Ok(SocketAddress::Abstract("kms".into())));
        assert_eq!(p("unix:///@kms"), Ok(SocketAddress::Abstract("kms".into())));
        assert!(p("k.sock").is_err());
        assert!(p("@").is_err());
        assert!(p("/").is_err());
        assert!(p(&format!("/{}", "a".repeat(120))).is_err());
    }

    #[test]
    fn groups() {
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert!(resolve_group("no-such-group-here").is_err());
    }
}

//! Whose point of view the file checks take: this process's user, or, for
//! `kms-plugin check --as-user UID[:GID]` run as root, the user the plugin will run as (the
//! manifest's `runAsUser`/`runAsGroup`). Root passes every permission check, so without this a
//! root `check` could neither accept a layout made for uid 65532 nor see what 65532 cannot read.
//!
//! The access rule is the classic owner/group/other one (no ACLs, no supplementary groups): a
//! layout that needs either is refused with the exact `chown`/`chmod` that makes it plain.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

/// A uid, and the gid if known (without one, group permission bits grant nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: Option<u32>,
}

impl FromStr for Identity {
    type Err = String;

    /// `UID` or `UID:GID`, numeric: the manifest's runAsUser/runAsGroup, which the host's
    /// /etc/passwd may not name.
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |part: &str| {
            part.parse::<u32>()
                .map_err(|_| format!("{s:?}: expected UID or UID:GID, numeric (e.g. 65532:0)"))
        };
        match s.split_once(':') {
            Some((uid, gid)) => Ok(Self {
                uid: num(uid)?,
                gid: Some(num(gid)?),
            }),
            None => Ok(Self {
                uid: num(s)?,
                gid: None,
            }),
        }
    }
}

static AS_USER: OnceLock<Identity> = OnceLock::new();

/// From now on, checks take `id`'s point of view (set once, by `check --as-user`).
pub fn set_as_user(id: Identity) {
    let _ = AS_USER.set(id);
}

/// Whether `--as-user` set the point of view.
pub fn is_as_user() -> bool {
    AS_USER.get().is_some()
}

/// The identity checks are made for.
pub fn current() -> Identity {
    AS_USER.get().copied().unwrap_or_else(|| Identity {
        uid: rustix::process::geteuid().as_raw(),
        gid: Some(rustix::process::getegid().as_raw()),
    })
}

/// Permission bits, as in one rwx triplet.
pub const READ: u32 = 4;
pub const WRITE: u32 = 2;
pub const SEARCH: u32 = 1;

/// Whether `id` has every bit of `want` on a file with `meta` (root: always).
pub fn may(id: Identity, meta: &Metadata, want: u32) -> bool {
    if id.uid == 0 {
        return true;
    }
    let mode = meta.mode();
    let bits = if meta.uid() == id.uid {
        mode >> 6
    } else if id.gid == Some(meta.gid()) {
        mode >> 3
    } else {
        mode
    } & 0o7;
    bits & want == want
}

/// Why a directory would let someone other than `id` and root replace what is in it, naming
/// the cause (owner or mode) and the command that fixes it; None if it is safe. `fix_owner`:
/// whom the fix chowns it to. `sticky_ok`: a sticky directory (others cannot remove what they
/// do not own) is safe for files, not for a socket's directory (others could bind the name).
pub fn unsafe_directory(dir: &Path, meta: &Metadata, id: Identity, fix_owner: u32, sticky_ok: bool) -> Option<String> {
    if let Some(why) = unsafe_owner(dir, meta, id, fix_owner) {
        return Some(why);
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && !(sticky_ok && mode & 0o1000 != 0) {
        return Some(format!(
            "{} (mode {mode:o}, uid {}) is writable by group or others, who could replace what is in it; fix: chmod {:o} {}",
            dir.display(),
            meta.uid(),
            mode & !0o1022,
            dir.display(),
        ));
    }
    None
}

/// The owner half of [`unsafe_directory`]: why `dir` is not owned by `id`'s user or root.
pub fn unsafe_owner(dir: &Path, meta: &Metadata, id: Identity, fix_owner: u32) -> Option<String> {
    let mode = meta.mode() & 0o7777;
    if meta.uid() != id.uid && meta.uid() != 0 {
        let allowed = if id.uid == 0 {
            "root (this process's user)".to_string()
        } else {
            format!("the plugin's user (uid {}) or root", id.uid)
        };
        return Some(format!(
            "{} (mode {mode:o}) is owned by uid {}, who could replace what is in it: it must be owned by {allowed}; fix: chown {fix_owner} {}{}",
            dir.display(),
            meta.uid(),
            dir.display(),
            root_hint(meta.uid()),
        ));
    }
    None
}

/// For a root process without `--as-user` refusing a path owned by `owner`: the likely cause
/// is that the plugin runs as that user and this check was not told.
pub fn root_hint(owner: u32) -> String {
    if !is_as_user() && rustix::process::geteuid().is_root() && owner != 0 {
        format!(" (or, if the plugin runs as uid {owner}, run `kms-plugin check` with --as-user {owner}[:GID])")
    } else {
        String::new()
    }
}

/// "uid U, gid G" (or "uid U" when the gid is not known), for messages.
pub fn describe(id: Identity) -> String {
    match id.gid {
        Some(gid) => format!("uid {}, gid {gid}", id.uid),
        None => format!("uid {}", id.uid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_numeric_user_and_group() {
        assert_eq!(
            "65532:0".parse(),
            Ok(Identity {
                uid: 65532,
                gid: Some(0)
            })
        );
        assert_eq!("65532".parse(), Ok(Identity { uid: 65532, gid: None }));
        assert!("nonroot".parse::<Identity>().is_err());
        assert!("1:".parse::<Identity>().is_err());
    }

    #[test]
    fn owner_group_other_bits_decide_access() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        let owner = Identity {
            uid: meta.uid(),
            gid: None,
        };
        let other = Identity {
            uid: meta.uid().wrapping_add(7).max(1),
            gid: None,
        };
        let group = Identity {
            uid: other.uid,
            gid: Some(meta.gid()),
        };
        if meta.uid() != 0 {
            assert!(may(owner, &meta, READ | WRITE));
            assert!(!may(owner, &meta, SEARCH));
        }
        assert!(!may(other, &meta, READ));
        assert!(may(group, &meta, READ) && !may(group, &meta, WRITE));
        assert!(may(Identity { uid: 0, gid: None }, &meta, READ | WRITE));
    }

    #[test]
    fn unsafe_directory_names_the_cause_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = Identity {
            uid: 65532,
            gid: Some(0),
        };
        let shown = dir.path().display();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
        // The suite runs as root (as CI does): root owns the directory.
        let meta = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(meta.uid(), 0, "run the unit tests as root");
        let why = unsafe_directory(dir.path(), &meta, plugin, 65532, false).unwrap();
        assert!(why.contains(&format!("fix: chmod 750 {shown}")), "{why}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        let meta = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(unsafe_directory(dir.path(), &meta, plugin, 65532, false), None);
        // The same 0750 directory owned by uid 4242: the owner is the cause, not the mode.
        rustix::fs::chown(dir.path(), Some(rustix::fs::Uid::from_raw(4242)), None).unwrap();
        let meta = std::fs::metadata(dir.path()).unwrap();
        let why = unsafe_directory(dir.path(), &meta, plugin, 65532, false).unwrap();
        assert!(why.contains("owned by uid 4242"), "{why}");
        assert!(why.contains(&format!("fix: chown 65532 {shown}")), "{why}");
        assert!(!why.contains("writable"), "{why}");
        // Sticky and group-writable: fine for files, not for a socket's directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        rustix::fs::chown(dir.path(), Some(rustix::fs::Uid::ROOT), None).unwrap();
        let meta = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(unsafe_directory(dir.path(), &meta, plugin, 0, true), None);
        let why = unsafe_directory(dir.path(), &meta, plugin, 0, false).unwrap();
        assert!(why.contains(&format!("fix: chmod 755 {shown}")), "{why}");
    }
}

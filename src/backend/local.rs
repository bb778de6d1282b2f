//! The embedded default backend: root keys in local 32-byte files.
//!
//! Meant for a laptop, a test cluster, or a control plane whose disk is itself protected; the
//! root key file is the crown jewel, so the loader refuses files readable by group or others.
//! key_id = `local:` + the first 128 bits of a domain-separated SHA-256 of the key: stable across
//! restarts and nodes, and revealing nothing about the key.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use ring::digest;
use ring::rand::SystemRandom;
use serde::Deserialize;

use super::{Backend, BackendError, ErrorKind, Wrapped};
use crate::secret::aead;
use crate::secret::{KEY_LEN, Kek};

const KEY_ID_DOMAIN: &[u8] = b"kms-plugin/local-root-key-id/v1\0";
const WRAP_AAD_DOMAIN: &[u8] = b"kms-plugin/local-wrap/v1\0";

/// `[backend]` with `type = "local"`: root keys in local files (the embedded default).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSettings {
    /// The key that wraps new local KEKs.
    pub current_key_file: PathBuf,
    /// Older keys, kept to decrypt data written before a rotation.
    #[serde(default)]
    pub decrypt_only_key_files: Vec<PathBuf>,
}

impl LocalSettings {
    /// The key files, for change detection.
    pub fn files(&self) -> Vec<PathBuf> {
        std::iter::once(self.current_key_file.clone())
            .chain(self.decrypt_only_key_files.iter().cloned())
            .collect()
    }

    pub async fn build(&self) -> Result<Arc<dyn Backend>, String> {
        let (current, old) = (self.current_key_file.clone(), self.decrypt_only_key_files.clone());
        let backend = super::off_thread(move || LocalBackend::open(&current, &old).map_err(|e| e.to_string())).await?;
        Ok(Arc::new(backend))
    }
}

/// Local root keys: one current (wraps new KEKs), any number of decrypt-only older ones.
pub struct LocalBackend {
    current: String,
    keys: HashMap<String, Kek>,
    /// (key_id, file) of each decrypt-only key, in configuration order.
    decrypt_only: Vec<(String, String)>,
    rng: SystemRandom,
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("root key file {0}")]
    File(#[from] crate::secret_file::SecretFileError),
    #[error("root key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    // Someone coming from `aescbc` writes the key in base64 (44 characters and a newline).
    #[error(
        "root key file {path} holds {len} bytes; a root key is 32 raw bytes, not base64 or hex text; use `kms-plugin keygen --out {path}`"
    )]
    WrongLength { path: PathBuf, len: u64 },
    #[error("root key file {path}: directory {dir} does not exist; create it first (mkdir -m 0700 -p {dir})")]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("root key file {path} holds an all-zero key; generate one with `kms-plugin keygen`")]
    AllZero { path: PathBuf },
    #[error("root key file {path} holds the same key as another configured key file")]
    Duplicate { path: PathBuf },
}

impl LocalBackend {
    /// Loads the current key and the decrypt-only keys, checking each file's mode and size.
    pub fn open(current: &Path, decrypt_only: &[PathBuf]) -> Result<Self, KeyFileError> {
        let current_key = read_key_file(current)?;
        let current_id = key_id(&current_key);
        let mut keys = HashMap::new();
        keys.insert(current_id.clone(), current_key);
        let mut names = Vec::new();
        for path in decrypt_only {
            let key = read_key_file(path)?;
            let id = key_id(&key);
            names.push((id.clone(), path.display().to_string()));
            if keys.insert(id, key).is_some() {
                return Err(KeyFileError::Duplicate { path: path.clone() });
            }
        }
        Ok(Self {
            current: current_id,
            keys,
            decrypt_only: names,
            rng: SystemRandom::new(),
        })
    }

    /// Builds the backend from keys already in memory (tests, benchmarks, fuzzing).
    pub fn from_keys(current: Kek, decrypt_only: Vec<Kek>) -> Self {
        let current_id = key_id(&current);
        let mut keys: HashMap<String, Kek> = decrypt_only.into_iter().map(|k| (key_id(&k), k)).collect();
        keys.insert(current_id.clone(), current);
        let mut names: Vec<(String, String)> = keys
            .keys()
            .filter(|id| **id != current_id)
            .map(|id| (id.clone(), "(in memory)".to_string()))
            .collect();
        names.sort();
        Self {
            current: current_id,
            keys,
            decrypt_only: names,
            rng: SystemRandom::new(),
        }
    }

    /// key_id of the current root key.
    pub fn current_key_id(&self) -> &str {
        &self.current
    }
}

/// The public, stable name of a local root key.
pub fn key_id(key: &Kek) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(KEY_ID_DOMAIN);
    ctx.update(key.expose());
    format!("local:{}", hex::encode(&ctx.finish().as_ref()[..16]))
}

fn wrap_aad(key_id: &str) -> Vec<u8> {
    [WRAP_AAD_DOMAIN, key_id.as_bytes()].concat()
}

fn read_key_file(path: &Path) -> Result<Kek, KeyFileError> {
    // Group and others get nothing; one byte more than a key shows a wrong length.
    let policy = crate::secret_file::Policy {
        deny_mode: 0o077,
        max_len: KEY_LEN as u64 + 1,
    };
    let bytes = match crate::secret_file::read(path, &policy) {
        Err(crate::secret_file::SecretFileError::TooLong { len, .. }) => {
            return Err(KeyFileError::WrongLength {
                path: path.to_owned(),
                len,
            });
        }
        other => other?,
    };
    if bytes.len() != KEY_LEN {
        return Err(KeyFileError::WrongLength {
            path: path.to_owned(),
            len: bytes.len() as u64,
        });
    }
    if bytes.iter().all(|b| *b == 0) {
        return Err(KeyFileError::AllZero { path: path.to_owned() });
    }
    Ok(Kek::from_bytes(&bytes).expect("exactly 32 bytes"))
}

/// Writes a new random root key to `path` with mode 0600; never overwrites an existing file.
pub fn generate_key_file(path: &Path) -> Result<String, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let key = Kek::generate(&SystemRandom::new())
        .map_err(|_| io(std::io::Error::other("system random number generator failed")))?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            Some(dir) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => KeyFileError::NoDirectory {
                path: path.to_owned(),
                dir: dir.to_owned(),
            },
            _ => io(e),
        })?;
    file.write_all(key.expose()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(key_id(&key))
}

#[async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn probe(&self) -> Result<String, BackendError> {
        Ok(self.current.clone())
    }

    fn knows(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    fn decrypt_only(&self) -> Vec<(String, String)> {
        self.decrypt_only.clone()
    }

    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError> {
        let root = &self.keys[&self.current];
        let mut blob = Vec::new();
        aead::seal_into(&mut blob, root, &wrap_aad(&self.current), kek.expose(), &self.rng)
            .map_err(|_| BackendError::new(ErrorKind::Transient, "random number generator failed"))?;
        Ok(Wrapped {
            key_id: self.current.clone(),
            blob,
        })
    }

    fn max_wrapped_len(&self) -> usize {
        crate::secret::aead::OVERHEAD + KEY_LEN
    }

    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        let root = self
            .keys
            .get(key_id)
            .ok_or_else(|| BackendError::new(ErrorKind::UnknownKey, "key_id is not a configured local root key"))?;
        let plain = aead::open(root, &wrap_aad(key_id), blob)
            .map_err(|_| BackendError::new(ErrorKind::BadWrappedKey, "wrapped KEK failed authentication"))?;
        Kek::from_bytes(&plain)
            .ok_or_else(|| BackendError::new(ErrorKind::BadWrappedKey, "wrapped KEK has the wrong length"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret_file::SecretFileError;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[tokio::test]
    async fn wrap_unwrap_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        let id_a = generate_key_file(&a).unwrap();
        let id_b = generate_key_file(&b).unwrap();
        assert_ne!(id_a, id_b);
        assert!(id_a.starts_with("local:") && id_a.len() == 6 + 32);

        let old = LocalBackend::open(&a, &[]).unwrap();
        assert_eq!(old.probe().await.unwrap(), id_a);
        let kek = Kek::generate(&SystemRandom::new()).unwrap();
        let w = old.wrap(&kek).await.unwrap();
        assert_eq!(w.key_id, id_a);

        let new = LocalBackend::open(&b, std::slice::from_ref(&a)).unwrap();
        assert_eq!(new.current_key_id(), id_b);
        assert!(new.knows(&id_a) && new.knows(&id_b) && !new.knows("local:00"));
        let back = new.unwrap(&id_a, &w.blob).await.unwrap();
        assert_eq!(back.expose(), kek.expose());
        // Wrong key_id for the blob, or a tampered blob: refused, never a wrong key.
        let e = new.unwrap(&id_b, &w.blob).await.err().unwrap();
        assert_eq!(e.kind, ErrorKind::BadWrappedKey);
        let mut bad = w.blob.clone();
        bad[20] ^= 0x80;
        assert_eq!(
            new.unwrap(&id_a, &bad).await.err().unwrap().kind,
            ErrorKind::BadWrappedKey
        );
        assert_eq!(
            new.unwrap("local:x", &w.blob).await.err().unwrap().kind,
            ErrorKind::UnknownKey
        );
    }

    #[test]
    fn refuses_bad_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        generate_key_file(&p).unwrap();
        assert!(generate_key_file(&p).is_err(), "keygen must not overwrite");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);

        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = LocalBackend::open(&p, &[]).err().unwrap();
        assert!(
            matches!(e, KeyFileError::File(SecretFileError::TooOpen { mode: 0o640, .. })),
            "{e}"
        );

        let short = dir.path().join("short");
        fs::write(&short, [0u8; 31]).unwrap();
        fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            LocalBackend::open(&short, &[]),
            Err(KeyFileError::WrongLength { len: 31, .. })
        ));
        let zero = dir.path().join("zero");
        fs::write(&zero, [0u8; 32]).unwrap();
        fs::set_permissions(&zero, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            LocalBackend::open(&zero, &[]),
            Err(KeyFileError::AllZero { .. })
        ));
        assert!(matches!(
            LocalBackend::open(dir.path(), &[]),
            Err(KeyFileError::File(SecretFileError::NotAFile { .. }))
        ));
        assert!(matches!(
            LocalBackend::open(&dir.path().join("missing"), &[]),
            Err(KeyFileError::File(SecretFileError::Io { .. }))
        ));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            LocalBackend::open(&p, std::slice::from_ref(&p)),
            Err(KeyFileError::Duplicate { .. })
        ));
    }

    #[test]
    fn key_id_is_stable_and_not_the_key() {
        let kek = Kek::from_bytes(&[7u8; 32]).unwrap();
        assert_eq!(key_id(&kek), key_id(&Kek::from_bytes(&[7u8; 32]).unwrap()));
        assert!(!key_id(&kek).contains(&hex::encode([7u8; 16])));
    }
}

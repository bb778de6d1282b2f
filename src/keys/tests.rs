//! `Keys` against an in-process fake backend: the hierarchy's rules without a server.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::*;

/// Root keys in memory; wrapping is an XOR with the root key (enough to tell keys apart).
struct Fake {
    current: Mutex<String>,
    roots: Mutex<HashMap<String, [u8; KEY_LEN]>>,
    /// What the next probes answer instead of the current key_id.
    probe_error: Mutex<Option<BackendError>>,
    unwraps: AtomicUsize,
    unwrap_delay: Duration,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            current: Mutex::new("fake:1".into()),
            roots: Mutex::new(HashMap::from([("fake:1".to_string(), [1; KEY_LEN])])),
            probe_error: Mutex::new(None),
            unwraps: AtomicUsize::new(0),
            unwrap_delay: Duration::from_millis(50),
        })
    }

    fn xor(root: &[u8; KEY_LEN], bytes: &[u8]) -> Vec<u8> {
        root.iter().zip(bytes).map(|(a, b)| a ^ b).collect()
    }
}

#[async_trait]
impl Backend for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn probe(&self) -> Result<String, BackendError> {
        match self.probe_error.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(self.current.lock().unwrap().clone()),
        }
    }

    fn knows(&self, key_id: &str) -> bool {
        self.roots.lock().unwrap().contains_key(key_id)
    }

    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError> {
        let key_id = self.current.lock().unwrap().clone();
        let root = self.roots.lock().unwrap()[&key_id];
        Ok(Wrapped {
            blob: Fake::xor(&root, kek.expose()),
            key_id,
        })
    }

    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.unwrap_delay).await;
        let root = self.roots.lock().unwrap().get(key_id).copied();
        let root = root.ok_or_else(|| BackendError::new(ErrorKind::UnknownKey, "unknown"))?;
        Kek::from_bytes(&Fake::xor(&root, blob)).ok_or_else(|| BackendError::new(ErrorKind::BadWrappedKey, "length"))
    }
}

fn keys(backend: &Arc<Fake>) -> Arc<Keys> {
    Keys::new(
        Arc::clone(backend) as Arc<dyn Backend>,
        RotationPolicy::default(),
        NonZeroUsize::new(16).unwrap(),
        Duration::from_secs(60),
    )
}

#[tokio::test]
async fn a_sealed_seed_opens_and_nothing_else_does() {
    let fake = Fake::new();
    let k = keys(&fake);
    k.check_and_rotate().await.unwrap();
    let sealed = k.encrypt(b"seed").await.unwrap();
    let wrapped = sealed.wrapped_kek.clone();
    let opened = k
        .decrypt(&sealed.key_id, &wrapped, &sealed.ciphertext, None)
        .await
        .unwrap();
    assert_eq!(opened.expose(), b"seed");
    assert!(matches!(
        k.decrypt("fake:other", &wrapped, &sealed.ciphertext, None).await,
        Err(Error::UnknownKeyId)
    ));
    let mut tampered = sealed.ciphertext.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(k.decrypt(&sealed.key_id, &wrapped, &tampered, None).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_cold_decrypts_make_one_unwrap() {
    let fake = Fake::new();
    let writer = keys(&fake);
    writer.check_and_rotate().await.unwrap();
    let sealed = writer.encrypt(b"seed").await.unwrap();
    // Another process's view: same backend, cold cache.
    let reader = keys(&fake);
    let before = fake.unwraps.load(Ordering::SeqCst);
    let wrapped = sealed.wrapped_kek.clone();
    let sealed = Arc::new(sealed);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (reader, wrapped, sealed) = (Arc::clone(&reader), wrapped.clone(), Arc::clone(&sealed));
        calls.spawn(async move { reader.decrypt(&sealed.key_id, &wrapped, &sealed.ciphertext, None).await });
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap().expose(), b"seed");
    }
    assert_eq!(fake.unwraps.load(Ordering::SeqCst) - before, 1);
}

#[tokio::test]
async fn a_new_root_key_makes_a_new_kek_and_old_seeds_still_open() {
    let fake = Fake::new();
    let k = keys(&fake);
    k.check_and_rotate().await.unwrap();
    let old = k.encrypt(b"old").await.unwrap();
    fake.roots.lock().unwrap().insert("fake:2".into(), [2; KEY_LEN]);
    *fake.current.lock().unwrap() = "fake:2".into();
    k.check_and_rotate().await.unwrap();
    assert_eq!(k.current().unwrap().key_id(), "fake:2");
    let new = k.encrypt(b"new").await.unwrap();
    assert_eq!(new.key_id, "fake:2");
    let wrapped = old.wrapped_kek.clone();
    assert_eq!(
        k.decrypt(&old.key_id, &wrapped, &old.ciphertext, None)
            .await
            .unwrap()
            .expose(),
        b"old"
    );
}

#[tokio::test]
async fn revocation_needs_two_authoritative_answers_in_a_row_and_outages_never_purge() {
    let fake = Fake::new();
    let k = keys(&fake);
    k.check_and_rotate().await.unwrap();
    let sealed = k.encrypt(b"seed").await.unwrap();
    let wrapped = sealed.wrapped_kek.clone();
    k.decrypt(&sealed.key_id, &wrapped, &sealed.ciphertext, None)
        .await
        .unwrap();
    assert_eq!(k.cache().len(), 1);

    // Outage: however long, the cache and the current KEK stay.
    *fake.probe_error.lock().unwrap() = Some(BackendError::new(ErrorKind::Transient, "down"));
    for _ in 0..5 {
        assert!(k.check_and_rotate().await.is_err());
    }
    assert_eq!((k.health_flags().0, k.cache().len()), (false, 1));
    assert!(k.current().is_some());

    // One authoritative refusal, then a good probe: nothing purged.
    *fake.probe_error.lock().unwrap() = Some(BackendError::new(ErrorKind::KeyUnusable, "disabled"));
    assert!(k.check_and_rotate().await.is_err());
    assert_eq!((k.health_flags().0, k.cache().len()), (false, 1));
    *fake.probe_error.lock().unwrap() = None;
    k.check_and_rotate().await.unwrap();

    // Two in a row: revoked, purged, and the current KEK retired.
    *fake.probe_error.lock().unwrap() = Some(BackendError::new(ErrorKind::KeyUnusable, "disabled"));
    assert!(k.check_and_rotate().await.is_err());
    assert!(k.check_and_rotate().await.is_err());
    assert!(k.health_flags().0);
    assert_eq!(k.cache().len(), 0);
    assert!(k.current().is_none());
    assert!(k.encrypt(b"x").await.is_err());
    assert!(
        k.decrypt(&sealed.key_id, &wrapped, &sealed.ciphertext, None)
            .await
            .is_err()
    );

    // Re-enabled: the next probe recovers.
    *fake.probe_error.lock().unwrap() = None;
    k.check_and_rotate().await.unwrap();
    assert!(!k.health_flags().0);
    assert_eq!(
        k.decrypt(&sealed.key_id, &wrapped, &sealed.ciphertext, None)
            .await
            .unwrap()
            .expose(),
        b"seed"
    );
}

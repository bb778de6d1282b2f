//! The `kmip` backend against a scripted server (integration/common/fake_kmip.rs) giving
//! answers no real server gives. The rule under test: only an authoritative answer, seen twice
//! in a row, revokes a key; an ambiguous or malformed answer is an outage, never a revocation;
//! a server's answer never makes a probe do unbounded work. (The plain lifecycle is tested
//! against pykmip-server in kmip.rs.)

use std::sync::atomic::Ordering::Relaxed;

use tonic::Code;

use crate::common::fake_kmip::{FakeKmip, Mode};
use crate::common::*;
use kms_plugin::client::Client;
use kms_plugin::proto::v2::{EncryptResponse, StatusRequest};

/// Fast probes and a long outage allowance: an ambiguous answer must never fail Status here.
const PROBE: &str = "[probe]\ninterval = \"200ms\"\nmax_outage = \"60s\"";
const CONFIRMING: &str = "confirming with another probe";
const PURGED: &str = "root key unusable: cached KEKs purged";
const CACHE_SIZE: &str = "kms_plugin_kek_cache_size ";

/// Waits until the server has seen `n` more Locates (probes).
async fn probes(kmip: &FakeKmip, n: u64) {
    let target = kmip.counts().locates.load(Relaxed) + n;
    eventually("more probes", || async {
        kmip.counts().locates.load(Relaxed) >= target
    })
    .await;
}

/// A seed sealed and decrypted once, so its KEK is cached.
async fn cached_seed(c: &mut Client) -> (Vec<u8>, EncryptResponse) {
    let seed = rand_bytes(32);
    let e = encrypt(c, &seed).await;
    assert_eq!(decrypt(c, &e).await.unwrap(), seed);
    (seed, e)
}

/// Nothing revoked: the cached KEK is still there and served.
async fn assert_not_revoked(plugin: &Plugin, c: &mut Client, (seed, e): &(Vec<u8>, EncryptResponse), what: &str) {
    assert_eq!(&decrypt(c, e).await.unwrap(), seed, "{what}");
    assert!(plugin.metric(CACHE_SIZE).await >= 1.0, "{what}");
    let logs = plugin.logs();
    assert!(!logs.contains(PURGED) && !logs.contains(CONFIRMING), "{what}:\n{logs}");
}

async fn status_code(c: &Client) -> Code {
    match c.clone().status(StatusRequest {}).await {
        Ok(s) if s.get_ref().healthz == "ok" => Code::Ok,
        Ok(_) => Code::Unknown,
        Err(e) => e.code(),
    }
}

#[tokio::test]
async fn kmip_ambiguous_or_malformed_answers_never_revoke() {
    let dir = Dir::new();
    let kmip = FakeKmip::start(&dir);
    let plugin = Plugin::start(&kmip.config(&dir, "kms-root", PROBE)).await;
    let mut c = plugin.client().await;
    let sealed = cached_seed(&mut c).await;
    for mode in [
        Mode::LocateEmpty,
        Mode::GeneralFailure,
        Mode::AnonymousNotFound,
        Mode::OtherOperation,
        Mode::Garbage,
        Mode::NoState,
    ] {
        kmip.set_mode(mode);
        // Several probes in a row get the answer: each a transient failure, never a verdict.
        probes(&kmip, 4).await;
        assert_eq!(status(&mut c).await.healthz, "ok", "{mode:?}");
        assert_not_revoked(&plugin, &mut c, &sealed, &format!("{mode:?}")).await;
        kmip.set_mode(Mode::Normal);
        probes(&kmip, 2).await;
    }
    let logs = plugin.stop_with_logs().await;
    assert!(logs.contains("malformed answer"), "{logs}");
}

#[tokio::test]
async fn kmip_a_locate_finding_nothing_is_an_outage_that_heals() {
    let dir = Dir::new();
    let kmip = FakeKmip::start(&dir);
    let plugin =
        Plugin::start(&kmip.config(&dir, "kms-root", "[probe]\ninterval = \"200ms\"\nmax_outage = \"2s\"")).await;
    let mut c = plugin.client().await;
    let sealed = cached_seed(&mut c).await;
    kmip.set_mode(Mode::LocateEmpty);
    // Past max_outage Status fails as an outage (Unavailable, not FailedPrecondition), and
    // still nothing is purged.
    eventually("Status to fail", || async { status_code(&c).await != Code::Ok }).await;
    assert_eq!(status_code(&c).await, Code::Unavailable);
    assert_not_revoked(&plugin, &mut c, &sealed, "past max_outage").await;
    kmip.set_mode(Mode::Normal);
    eventually("Status to recover", || async { status_code(&c).await == Code::Ok }).await;
    assert_not_revoked(&plugin, &mut c, &sealed, "healed").await;
    plugin.stop().await;
}

#[tokio::test]
async fn kmip_an_authoritative_refusal_seen_twice_revokes_and_purges() {
    let dir = Dir::new();
    let kmip = FakeKmip::start(&dir);
    let plugin = Plugin::start(&kmip.config(&dir, "kms-root", PROBE)).await;
    let mut c = plugin.client().await;
    let count = |what: &str| plugin.logs().matches(what).count();
    for (once, stuck) in [
        (Mode::Gone { once: true }, Mode::Gone { once: false }),
        (Mode::Deactivated { once: true }, Mode::Deactivated { once: false }),
    ] {
        let (seed, e) = cached_seed(&mut c).await;
        let (confirming, purged) = (count(CONFIRMING), count(PURGED));
        // Once, then the key is back: noted, not acted on.
        kmip.set_mode(once);
        eventually("the refusal to be noted", || async { count(CONFIRMING) > confirming }).await;
        probes(&kmip, 3).await;
        assert_eq!(status_code(&c).await, Code::Ok, "{once:?}");
        assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed, "{once:?}");
        assert_eq!(count(PURGED), purged, "{once:?}:\n{}", plugin.logs());
        // Twice in a row: revoked and purged.
        kmip.set_mode(stuck);
        eventually("the purge", || async { count(PURGED) > purged }).await;
        eventually("Status to fail", || async { status_code(&c).await != Code::Ok }).await;
        assert_eq!(status_code(&c).await, Code::FailedPrecondition, "{stuck:?}");
        assert_eq!(plugin.metric(CACHE_SIZE).await, 0.0, "{stuck:?}");
        assert_eq!(
            decrypt(&mut c, &e).await.unwrap_err().code(),
            Code::FailedPrecondition,
            "{stuck:?}"
        );
        // The key back: the plugin heals by itself.
        kmip.set_mode(Mode::Normal);
        eventually("Status to recover", || async { status_code(&c).await == Code::Ok }).await;
    }
    plugin.stop().await;
}

#[tokio::test]
async fn kmip_a_short_plaintext_is_an_outage_and_not_remembered() {
    let dir = Dir::new();
    let kmip = FakeKmip::start(&dir);
    let config = kmip.config(&dir, "kms-root", PROBE);
    let maker = Plugin::start(&config).await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut maker.client().await, &seed).await;
    maker.stop().await;
    // A fresh process: the KEK of `e` is not cached, so its Decrypt asks the server.
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    kmip.set_mode(Mode::DecryptShort);
    let before = kmip.counts().decrypts.load(Relaxed);
    let err = decrypt(&mut c, &e).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        kmip.counts().decrypts.load(Relaxed) > before,
        "the server was not asked"
    );
    // The server is right again: the very next Decrypt of the same object succeeds.
    kmip.set_mode(Mode::Normal);
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    plugin.stop().await;
}

#[tokio::test]
async fn kmip_a_locate_flood_is_bounded_and_not_a_revocation() {
    let dir = Dir::new();
    let kmip = FakeKmip::start(&dir);
    let plugin = Plugin::start(&kmip.config(&dir, "kms-root", PROBE)).await;
    let mut c = plugin.client().await;
    let sealed = cached_seed(&mut c).await;
    for honor_max in [false, true] {
        // 60,000 Unique Identifiers (the most a 1 MiB message holds), all Active AES-256 keys.
        kmip.set_mode(Mode::LocateFlood { n: 60_000, honor_max });
        kmip.counts().max_get_attributes_per_locate.store(0, Relaxed);
        let target = kmip.counts().locates.load(Relaxed) + 3;
        eventually("three probes of the flood", || async {
            // Maximum Items (16) candidates, plus the last known current key.
            let per_probe = kmip.counts().max_get_attributes_per_locate.load(Relaxed);
            assert!(per_probe <= 17, "{per_probe} Get Attributes in one probe");
            kmip.counts().locates.load(Relaxed) >= target
        })
        .await;
        assert_eq!(status(&mut c).await.healthz, "ok", "honor_max {honor_max}");
        assert_not_revoked(&plugin, &mut c, &sealed, &format!("honor_max {honor_max}")).await;
    }
    plugin.stop().await;
}

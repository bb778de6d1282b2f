//! The scenarios, each written once for any [`RootKeyServer`]; `mod.rs` runs each against every
//! server.

use std::time::{Duration, Instant};

use kms_plugin::contract::KEK_ANNOTATION;
use kms_plugin::proto::v2::EncryptRequest;
use tonic::Code;

use super::{Case, DenyingServer, Pickup, Recovery, RemoteServer, RootKeyServer, try_status};
use crate::common::leaks::assert_no_leaks;
use crate::common::*;

const FAST_PROBE: &str = "[probe]\ninterval = \"200ms\"";

/// A KEK made and cached here, then opened cold by a new process through one backend unwrap
/// under the same key_id; a tampered wrapped KEK is refused, never opened under another key.
pub async fn round_trip_restart_and_tamper<S: RootKeyServer>() {
    let case = Case::<S>::new("").await;
    let plugin = case.plugin().await;
    let mut c = plugin.client().await;
    let st = status(&mut c).await;
    assert_eq!(st.healthz, "ok");
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    assert_contract(&e, &st.key_id);
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    plugin.stop().await;

    let plugin = case.plugin().await;
    let mut c = plugin.client().await;
    assert_eq!(status(&mut c).await.key_id, st.key_id, "same key_id after a restart");
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    assert_eq!(plugin.backend_calls("unwrap").await, 1);

    let mut bad = decrypt_request(&e);
    let mut blob = bad.annotations[KEK_ANNOTATION].to_vec();
    let i = blob.len() / 2;
    blob[i] = if blob[i] == b'A' { b'B' } else { b'A' };
    bad.annotations.insert(KEK_ANNOTATION.into(), blob.into());
    let code = c.decrypt(bad).await.unwrap_err().code();
    assert!(S::TAMPERED.contains(&code), "tampered wrapped KEK: {code:?}");
    plugin.stop().await;
}

/// A new root key becomes current in a running plugin (by its probe or a reload); data under
/// the old key still decrypts, and after a restart both open cold.
pub async fn rotation_keeps_old_ciphertexts<S: RootKeyServer>() {
    let mut case = Case::<S>::new(FAST_PROBE).await;
    let plugin = case.plugin().await;
    let mut c = plugin.client().await;
    let v1 = status(&mut c).await.key_id;
    let s1 = rand_bytes(32);
    let e1 = encrypt(&mut c, &s1).await;

    if case.server.rotate(&case.dir).await == Pickup::Reload {
        case.reload(&plugin);
    }
    let v2 = eventually_some("the new root key to be current", || async {
        try_status(&c).await.ok().map(|s| s.key_id).filter(|k| *k != v1)
    })
    .await;
    let s2 = rand_bytes(32);
    let e2 = encrypt(&mut c, &s2).await;
    assert_contract(&e2, &v2);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    plugin.stop().await;

    let plugin = case.plugin().await;
    let mut c = plugin.client().await;
    assert_eq!(status(&mut c).await.key_id, v2);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    assert_eq!(plugin.backend_calls("unwrap").await, 2);
    plugin.stop().await;
}

/// 64 concurrent Decrypts of one wrapped KEK the plugin has never seen cost one backend unwrap.
pub async fn concurrent_cold_decrypts_make_one_unwrap<S: RootKeyServer>() {
    let case = Case::<S>::new("").await;
    let (seed, cold) = case.cold().await;
    let plugin = case.plugin().await;
    let c = plugin.client().await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (mut c, e) = (c.clone(), cold.clone());
            tokio::spawn(async move { decrypt(&mut c, &e).await.unwrap() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), seed);
    }
    assert_eq!(plugin.backend_calls("unwrap").await, 1);
    plugin.stop().await;
}

/// A trace-level log of start-up, probes, a wrap and a cold unwrap carries none of the server's
/// secrets, the KEKs (where the harness can recover them) nor the plaintexts, in any spelling.
pub async fn trace_logs_carry_no_secrets<S: RootKeyServer>() {
    let case = Case::<S>::new(FAST_PROBE).await;
    let (cold_seed, cold) = case.cold().await;
    let plugin = case.traced_plugin().await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    assert_eq!(decrypt(&mut c, &cold).await.unwrap(), cold_seed);
    let probes = plugin.backend_calls("probe").await;
    eventually("two more probes", || async {
        plugin.backend_calls("probe").await >= probes + 2
    })
    .await;
    let logs = plugin.stop_with_logs().await;
    assert!(logs.contains(" TRACE "), "trace logs missing:\n{logs}");
    let mut secrets = case.server.secrets(&case.dir);
    for e in [&e, &cold] {
        secrets.extend(case.server.kek(&case.dir, e).await);
    }
    secrets.extend([seed, cold_seed]);
    assert_no_leaks(&logs, &secrets);
}

/// The server revokes the current key: Status fails with the server's code, the key's cached
/// KEKs are purged and its data refused; once the server recovers, so does the plugin.
pub async fn revocation_purges_and_recovers<S: RemoteServer>() {
    let mut case = Case::<S>::new(FAST_PROBE).await;
    let plugin = case.plugin().await;
    let mut c = plugin.client().await;
    let revoked = status(&mut c).await.key_id;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    assert_eq!(plugin.metric("kms_plugin_kek_cache_size ").await, 1.0);

    case.server.revoke(&case.dir).await;
    let err = eventually_some("Status to fail", || async { try_status(&c).await.err() }).await;
    assert_eq!(err.code(), S::REVOKED, "{err:?}");
    eventually("the revoked key's KEKs to be purged", || async {
        plugin.metric("kms_plugin_kek_cache_size ").await == 0.0
    })
    .await;
    let refused = [Code::FailedPrecondition, Code::PermissionDenied];
    let code = decrypt(&mut c, &e).await.unwrap_err().code();
    assert!(refused.contains(&code), "Decrypt under the revoked key: {code:?}");
    let request = EncryptRequest {
        plaintext: seed.clone().into(),
        uid: rand_hex(8),
    };
    let code = c.encrypt(request).await.unwrap_err().code();
    assert!(
        refused.contains(&code),
        "Encrypt with the revoked key current: {code:?}"
    );

    let recovery = case.server.recover(&case.dir).await;
    if recovery == Recovery::NewKey(Pickup::Reload) {
        case.reload(&plugin);
    }
    let now = eventually_some("Status to recover", || async { try_status(&c).await.ok() }).await;
    assert_eq!(now.healthz, "ok");
    match recovery {
        Recovery::SameKey => {
            assert_eq!(now.key_id, revoked);
            assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
        }
        Recovery::NewKey(_) => {
            assert_ne!(now.key_id, revoked);
            assert!(decrypt(&mut c, &e).await.is_err(), "the revoked key's data decrypted");
        }
    }
    let fresh = encrypt(&mut c, &seed).await;
    assert_contract(&fresh, &now.key_id);
    assert_eq!(decrypt(&mut c, &fresh).await.unwrap(), seed);
    plugin.stop().await;
}

/// The key manager takes the plugin's permission away: Status fails with PermissionDenied, the
/// current key's KEKs are purged (a denial is authoritative, like a revocation) and its data
/// refused; once permission is back, the same key serves again and its data decrypts.
#[cfg_attr(not(feature = "azure"), allow(dead_code))] // its servers are behind their features
pub async fn permission_denied_refuses_and_heals<S: DenyingServer>() {
    let mut case = Case::<S>::new(FAST_PROBE).await;
    let (cold_seed, cold) = case.cold().await;
    let plugin = case.plugin().await;
    let mut c = plugin.client().await;
    let key_id = status(&mut c).await.key_id;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;

    case.server.deny(&case.dir).await;
    let err = eventually_some("Status to fail", || async { try_status(&c).await.err() }).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    eventually("the denied key's KEKs to be purged", || async {
        plugin.metric("kms_plugin_kek_cache_size ").await == 0.0
    })
    .await;
    let err = decrypt(&mut c, &cold).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "cold Decrypt while denied: {err:?}");

    case.server.allow(&case.dir).await;
    let now = eventually_some("Status to recover", || async { try_status(&c).await.ok() }).await;
    assert_eq!((now.healthz.as_str(), now.key_id.as_str()), ("ok", key_id.as_str()));
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    assert_eq!(decrypt(&mut c, &cold).await.unwrap(), cold_seed);
    plugin.stop().await;
}

/// The server goes away: Status, Encrypt and cached Decrypts keep working and a cold Decrypt is
/// Unavailable; past max_outage Status fails; when the server is back, everything heals.
pub async fn outage_keeps_hot_paths_and_heals<S: RemoteServer>() {
    let mut case = Case::<S>::new("[probe]\ninterval = \"200ms\"\nmax_outage = \"2s\"").await;
    let (cold_seed, cold) = case.cold().await;
    let plugin = case.plugin().await;
    let mut c = plugin.client().await;
    let key_id = status(&mut c).await.key_id;
    let seed = rand_bytes(32);
    let hot = encrypt(&mut c, &seed).await;

    case.server.stop().await;
    let began = Instant::now();
    assert_eq!(status(&mut c).await.healthz, "ok");
    let fresh = encrypt(&mut c, &seed).await;
    assert_eq!(decrypt(&mut c, &fresh).await.unwrap(), seed);
    assert_eq!(decrypt(&mut c, &hot).await.unwrap(), seed);
    let err = decrypt(&mut c, &cold).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = eventually_some("Status to fail", || async { try_status(&c).await.err() }).await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let after = began.elapsed();
    assert!(after >= Duration::from_millis(1900), "Status failed after {after:?}");

    case.server.restart().await;
    let now = eventually_some("Status to recover", || async { try_status(&c).await.ok() }).await;
    assert_eq!(now.key_id, key_id);
    // What docs/operations.md tells the operator to look for once an outage is over.
    assert!(plugin.wait_log("backend healthy again").await, "{}", plugin.logs());
    let opened = eventually_some("the cold Decrypt to succeed", || async {
        decrypt(&mut c.clone(), &cold).await.ok()
    })
    .await;
    assert_eq!(opened, cold_seed);
    assert_eq!(decrypt(&mut c, &hot).await.unwrap(), seed);
    plugin.stop().await;
}

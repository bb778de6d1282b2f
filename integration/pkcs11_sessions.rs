//! Session recovery of the PKCS#11 backend, in-process against SoftHSM2: its own test binary,
//! because it sets SOFTHSM2_CONF for this process before anything else runs.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use common::Dir;
use common::softhsm::{MODULE, SoftHsm};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use kms_plugin::backend::Backend;
use kms_plugin::backend::pkcs11::{Pkcs11Backend, Pkcs11Settings};
use kms_plugin::keys::Kek;

#[test]
fn recovers_from_closed_sessions_and_logout_without_restart() {
    let dir = Dir::new();
    let hsm = SoftHsm::new(&dir);
    hsm.keygen("root-1");
    // SAFETY: set before any other thread exists in this single-test binary.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &hsm.conf) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let backend = Pkcs11Backend::open(&Pkcs11Settings {
            module: MODULE.into(),
            token_label: hsm.token.clone(),
            pin_file: Some(hsm.pin_file.clone()),
            pin_env: None,
            current_key_label: "root-1".into(),
            decrypt_only_key_labels: vec![],
            sessions: 2,
        })
        .map_err(|e| e.message)
        .unwrap();
        let kek = Kek::generate(&ring::rand::SystemRandom::new()).unwrap();
        let w = backend.wrap(&kek).await.unwrap();

        // Another handle on the same library instance closes every session (and so logs out).
        let ctx = Pkcs11::new(MODULE).unwrap();
        let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == hsm.token)
            .unwrap();
        // SAFETY: C_CloseAllSessions on the library this process already initialised; the
        // second dlopen handle refers to the same library instance.
        let rv = unsafe {
            let raw = cryptoki_sys::Pkcs11::new(MODULE).unwrap();
            raw.C_CloseAllSessions(slot.id() as cryptoki_sys::CK_SLOT_ID)
        };
        assert_eq!(rv, cryptoki_sys::CKR_OK);
        let back = backend
            .unwrap(&w.key_id, &w.blob)
            .await
            .expect("recovered after sessions closed");
        assert_eq!(back.expose(), kek.expose());

        // An explicit logout from another session of the application.
        let s = ctx.open_ro_session(slot).unwrap();
        s.logout().unwrap();
        drop(s);
        let w2 = backend.wrap(&kek).await.expect("recovered after logout");
        assert_eq!(
            backend.unwrap(&w2.key_id, &w2.blob).await.unwrap().expose(),
            kek.expose()
        );
        assert_eq!(backend.probe().await.unwrap(), w.key_id);
    });
}

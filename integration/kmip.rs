//! The `kmip` backend against a real KMIP server (PyKMIP's pykmip-server, mutual TLS; see
//! integration/common/kmip.rs): what only KMIP has. Round trip, rotation, revocation, outage,
//! coalescing and the log scan are in the shared suite (integration/suite/).

use crate::common::kmip::Kmip;
use crate::common::openbao::Pki;
use crate::common::*;

#[tokio::test]
async fn kmip_a_newer_object_under_the_name_that_is_not_aes_256_never_becomes_the_root_key() {
    let dir = Dir::new();
    let kmip = Kmip::start(&dir);
    kmip.create_key("kms-root");
    let plugin = Plugin::start(&kmip.config(&dir, "kms-root", "", "[probe]\ninterval = \"200ms\"")).await;
    let mut c = plugin.client().await;
    let first = status(&mut c).await.key_id;
    // Initial Date has a resolution of one second: the new object must be strictly newer.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    kmip.py("u = c.create(enums.CryptographicAlgorithm.AES, 128, name='kms-root', cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT])\nc.activate(u)");
    // Two full probes after the newer object: each has looked at it and kept the old key.
    let probes = plugin.backend_calls("probe").await;
    eventually("two probes", || async {
        plugin.backend_calls("probe").await >= probes + 2
    })
    .await;
    assert_eq!(status(&mut c).await.key_id, first, "an AES-128 key took over the name");
    assert_eq!(encrypt(&mut c, &rand_bytes(32)).await.key_id, first);
    plugin.stop().await;
}

#[tokio::test]
async fn kmip_a_wrong_client_certificate_is_a_clear_error() {
    let dir = Dir::new();
    let kmip = Kmip::start(&dir);
    kmip.create_key("kms-root");
    let other = Pki::new(&dir, "stranger");
    let good = kmip.config(&dir, "kms-root", "", "");
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace(
            &kmip.pki.client_cert.display().to_string(),
            &other.client_cert.display().to_string(),
        )
        .replace(
            &kmip.pki.client_key.display().to_string(),
            &other.client_key.display().to_string(),
        );
    let (ok, text) = check(&dir.write_config(&text));
    assert!(!ok);
    assert!(
        text.contains("kmip") && (text.contains("TLS") || text.contains("certificate")),
        "{text}"
    );
    let (ok, text) = check(&good);
    assert!(ok, "{text}");
}

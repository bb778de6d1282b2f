//! The AWS KMS backend end to end against moto's KMS server: what only AWS has. Round trip,
//! rotation, revocation, outage, coalescing and the log scan are in the shared suite
//! (integration/suite/).

use tonic::Code;

use crate::common::moto::Moto;
use crate::common::*;

/// An alias resolves to its key's ARN, which is the key_id; a key rotated away from and not
/// listed as decrypt-only after a restart is NotFound, never tried.
#[tokio::test]
async fn alias_resolves_to_the_key_arn_and_unlisted_old_keys_are_not_found() {
    let moto = Moto::start().await;
    let dir = Dir::new();
    let k1 = moto.create_key().await;
    moto.alias("alias/kms-plugin", &k1).await;
    let env = Moto::env();
    let plugin = Plugin::start_env(&moto.config(&dir, "alias/kms-plugin", &[], ""), &env).await;
    let mut c = plugin.client().await;
    assert_eq!(status(&mut c).await.key_id, k1, "key_id is the resolved key ARN");
    let e1 = encrypt(&mut c, &rand_bytes(32)).await;
    plugin.stop().await;

    let k2 = moto.create_key().await;
    moto.alias("alias/kms-plugin", &k2).await;
    let plugin = Plugin::start_env(&moto.config(&dir, "alias/kms-plugin", &[], ""), &env).await;
    let mut c = plugin.client().await;
    assert_eq!(status(&mut c).await.key_id, k2);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(plugin.backend_calls("unwrap").await, 0);
    plugin.stop().await;
}

//! Rotation through the apiserver for every backend with a real server in the tests: a new root
//! key at the key manager (or in the reloaded config) becomes the apiserver's key_id without a
//! plugin restart, and Secrets sealed under the old key still read after the apiserver's own
//! DEK cache is emptied by a restart.

use std::time::{Duration, Instant};

use crate::cluster::*;
use crate::common::rand_hex;
use crate::servers::Kind;

async fn rotation_through_the_apiserver(kind: Kind) {
    let mut cluster = Cluster::start(kind).await;
    let marker = rand_hex(8);
    create_secrets(&cluster.apiserver.client, "old", &marker, 10).await;
    let old = cluster.key_id().await;
    cluster.wait_apiserver_key_id(&old, Duration::from_secs(30)).await;
    let pid = cluster.plugin().child.id();

    let rotated = Instant::now();
    cluster.keys.rotate(&cluster.dir).await;
    let new = cluster.wait_plugin_key_id_change(&old).await;
    cluster.wait_apiserver_key_id(&new, Duration::from_secs(150)).await;
    measured(
        &format!("{kind:?}: rotation to the apiserver reporting the new key_id hash"),
        rotated.elapsed(),
    );
    cluster
        .wait_secret_stored_under(&new, "new", Duration::from_secs(60))
        .await;
    assert_eq!(cluster.plugin().child.id(), pid, "the plugin restarted");

    // A cold apiserver: every old Secret's seed is a Decrypt through the plugin.
    cluster.apiserver.restart().await;
    check_secrets(&cluster.apiserver.client, "old", &marker, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn rotation_local() {
    rotation_through_the_apiserver(Kind::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn rotation_pkcs11_softhsm2() {
    rotation_through_the_apiserver(Kind::Pkcs11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn rotation_vault_openbao() {
    rotation_through_the_apiserver(Kind::Vault).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn rotation_kmip_pykmip() {
    rotation_through_the_apiserver(Kind::Kmip).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn rotation_aws_moto() {
    rotation_through_the_apiserver(Kind::Aws).await;
}

#[cfg(feature = "gcp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn rotation_gcp_emulated() {
    rotation_through_the_apiserver(Kind::Gcp).await;
}

#[cfg(feature = "azure")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn rotation_azure_emulated() {
    rotation_through_the_apiserver(Kind::Azure).await;
}

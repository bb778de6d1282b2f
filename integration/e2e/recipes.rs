//! Each distribution recipe's EncryptionConfiguration and apiserver flags on a real
//! kube-apiserver: kubeadm (deploy/encryption-config.yaml, deploy/kubeadm/), k3s and RKE2
//! (the file their READMEs install, with the `kube-apiserver-arg+` of their config.yaml), and
//! OpenShift (its fixed endpoint, which deploy/encryption-config.yaml names). The apiserver must
//! start, become ready on kms-providers, and store a Secret sealed by the plugin.

use std::path::Path;

use crate::cluster::*;
use crate::common::etcd::Etcd;
use crate::common::{Dir, Plugin, rand_hex};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The apiserver flags of a k3s/RKE2 config drop-in, without the EncryptionConfiguration's
/// path (the test writes its own copy, pointed at the test plugin's socket).
fn recipe_flags(distro: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(format!("deploy/{distro}/config.yaml"))).unwrap();
    let readme = std::fs::read_to_string(Path::new(ROOT).join(format!("deploy/{distro}/README.md"))).unwrap();
    let mut flags = Vec::new();
    let mut in_args = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('#') {
            in_args = line.starts_with("kube-apiserver-arg+:");
            continue;
        }
        if let (true, Some(arg)) = (in_args, line.trim().strip_prefix("- ")) {
            match arg.strip_prefix("encryption-provider-config=") {
                // The recipe's file is the shared one: the README installs it there.
                Some(path) => assert!(
                    readme.contains(&format!("deploy/encryption-config.yaml {path}")),
                    "deploy/{distro}: {path} is not deploy/encryption-config.yaml"
                ),
                None => flags.push(format!("--{arg}")),
            }
        }
    }
    assert!(
        !flags.is_empty(),
        "deploy/{distro}/config.yaml: no apiserver flags read"
    );
    flags
}

async fn seals_a_secret(recipe: &str, flags: &[String]) {
    apiserver_binary();
    let dir = Dir::new();
    let etcd = Etcd::start(&dir).await;
    let keys = crate::servers::RootKeys::new(crate::servers::Kind::Local, &dir).await;
    let plugin = Plugin::start_env(&keys.config, &keys.env).await;
    let encryption = encryption_config(&dir, &plugin.socket);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let apiserver = Apiserver::start_with(&dir, &etcd, &encryption, &flags, "").await;
    assert!(apiserver.kms_ready().await, "{recipe}: kms-providers not ready");
    let marker = format!("e2e-{recipe}-{}", rand_hex(8));
    create_secrets(&apiserver.client, recipe, &marker, 1).await;
    let stored = etcd_values(&etcd, &format!("/registry/secrets/{NAMESPACE}/{recipe}-")).await;
    assert_eq!(stored.len(), 1, "{recipe}");
    for (key, value) in &stored {
        assert!(
            value.starts_with(format!("k8s:enc:kms:v2:{PROVIDER}:").as_bytes()),
            "{recipe}: {key} is not sealed by the plugin"
        );
    }
    check_secrets(&apiserver.client, recipe, &marker, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn every_recipes_encryption_configuration_starts_a_real_apiserver() {
    // kubeadm's patch leaves automatic reload optional (commented out); OpenShift's operator
    // writes its own flags, pointing at the same fixed endpoint.
    seals_a_secret("kubeadm", &[]).await;
    seals_a_secret("openshift", &[]).await;
    for distro in ["k3s", "rke2"] {
        seals_a_secret(distro, &recipe_flags(distro)).await;
    }
}

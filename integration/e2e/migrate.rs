//! `kms-plugin migrate` through a real apiserver: the rewrite path (interrupted and resumed),
//! the storage version migrator path, and the fall-back when the migrator misses its deadline.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::*;
use crate::common::rand_hex;
use crate::servers::Kind;

const SVM_API: [&str; 2] = [
    "--runtime-config=storagemigration.k8s.io/v1beta1=true",
    "--feature-gates=StorageVersionMigrator=true",
];

/// Rotates the root key and waits until the apiserver writes with the new one; returns
/// (old, new) key_ids.
async fn rotate(cluster: &mut Cluster) -> (String, String) {
    let old = cluster.key_id().await;
    cluster.keys.rotate(&cluster.dir).await;
    let new = cluster.wait_plugin_key_id_change(&old).await;
    cluster.wait_apiserver_key_id(&new, Duration::from_secs(150)).await;
    (old, new)
}

/// How many of the Secrets `<name>-*` etcd holds under `key_id`.
async fn secrets_under(cluster: &Cluster, name: &str, key_id: &str) -> usize {
    let values = etcd_values(&cluster.etcd, &format!("/registry/secrets/{NAMESPACE}/{name}-")).await;
    values.iter().filter(|(k, v)| stored_key_id(k, v) == key_id).count()
}

/// `<what>: N <label>` from migrate's per-resource line.
fn count(out: &str, what: &str, label: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{what}:")) && l.contains(label))
        .unwrap_or_else(|| panic!("no '{what}: … {label}' line in:\n{out}"));
    let before = line.split(label).next().unwrap();
    before
        .rsplit(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn migrate_rewrites_every_secret_resumes_after_an_interruption_and_proves_it() {
    let mut cluster = Cluster::start(Kind::Local).await;
    let client = cluster.apiserver.client.clone();
    let marker = rand_hex(8);
    create_secrets(&client, "m", &marker, 60).await;

    // Before a rotation there is nothing to do; a wrong provider name is an error, not a verdict.
    let (code, out) = cluster.migrate(&["--method", "rewrite"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verdict: every object"), "{out}");
    let (code, _) = cluster.migrate(&["--provider", "not-this-one"]);
    assert_eq!(code, 1);

    let (old, new) = rotate(&mut cluster).await;
    // This apiserver does not serve storagemigration.k8s.io: asked for it, migrate says so.
    let (code, _) = cluster.migrate(&["--method", "storage-version-migration"]);
    assert_eq!(code, 1);
    let (code, out) = cluster.migrate(&["--dry-run"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&format!("/registry/secrets/{NAMESPACE}/m-")), "{out}");
    assert_eq!(secrets_under(&cluster, "m", &new).await, 0, "--dry-run wrote");

    // From here on as a user with only deploy/migrate-rbac.yaml's ClusterRole.
    grant_migrate_role(&client).await;
    let restricted = format!("--kubeconfig={}", cluster.apiserver.restricted_kubeconfig().display());
    let as_restricted = |args: &[&str]| {
        let mut all = cluster.migrate_args(args);
        all[1] = restricted.clone();
        all
    };

    // Interrupted: killed after it re-sealed a few.
    let args = as_restricted(&["--method", "rewrite", "--rate", "4"]);
    let mut first = Command::new(crate::common::BIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the first run to re-seal 3 Secrets",
        Duration::from_secs(120),
        || async { secrets_under(&cluster, "m", &new).await >= 3 },
    )
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    let done_before = secrets_under(&cluster, "m", &new).await;
    assert!(done_before < 60, "the first run finished before it was interrupted");

    // Resumed: skips what is done, rewrites the rest, proves it.
    let started = Instant::now();
    let args = as_restricted(&["--method", "rewrite", "--rate", "200"]);
    let (code, out) = plugin_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    measured("migrate --method rewrite: resume over 60 Secrets", started.elapsed());
    assert_eq!(code, 0, "{out}");
    assert!(
        count(&out, "secrets", "already current") >= done_before as u64,
        "the rerun did not skip the {done_before} Secrets already re-sealed:\n{out}"
    );
    assert!(out.contains("verdict: every object"), "{out}");
    assert_eq!(secrets_under(&cluster, "m", &new).await, 60);
    let (code, report) = cluster.retirable(&old);
    assert_eq!(code, 0, "{report}");
    check_secrets(&client, "m", &marker, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn a_storage_version_migration_that_misses_its_deadline_falls_back_to_the_rewrite() {
    // The API is served, but no controller-manager runs the migrator.
    let mut cluster = Cluster::start_with(Kind::Local, &SVM_API).await;
    let marker = rand_hex(8);
    create_secrets(&cluster.apiserver.client, "f", &marker, 20).await;
    let (old, new) = rotate(&mut cluster).await;

    let (code, out) = cluster.migrate(&["--deadline", "15s"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("StorageVersionMigrations (storagemigration.k8s.io/v1beta1)"),
        "{out}"
    );
    assert!(out.contains("not finished within the deadline"), "{out}");
    assert!(out.contains("rewriting through the API"), "{out}");
    assert_eq!(secrets_under(&cluster, "f", &new).await, 20);
    let (code, report) = cluster.retirable(&old);
    assert_eq!(code, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER and kube-controller-manager; run integration/e2e.sh"]
async fn migrate_with_the_storage_version_migrator() {
    let mut cluster = Cluster::start_with(Kind::Local, &SVM_API).await;
    let _controllers = ControllerManager::start(
        &cluster.dir,
        &cluster.apiserver,
        &["--feature-gates=StorageVersionMigrator=true", "--controllers=*,svm"],
    );
    let marker = rand_hex(8);
    create_secrets(&cluster.apiserver.client, "v", &marker, 30).await;
    let (old, new) = rotate(&mut cluster).await;

    // The migrator waits until its garbage collector's informer has seen a resourceVersion at
    // or past the migration's, which on an idle cluster never comes: some write traffic, as any
    // live cluster has.
    let traffic = tokio::spawn({
        let client = cluster.apiserver.client.clone();
        async move {
            let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, NAMESPACE);
            for i in 0.. {
                let _ = api.create(&Default::default(), &secret(&format!("traffic-{i}"))).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    });
    let started = Instant::now();
    let args = cluster.migrate_args(&["--method", "storage-version-migration", "--deadline", "12m"]);
    let (code, out) =
        tokio::task::spawn_blocking(move || plugin_command(&args.iter().map(String::as_str).collect::<Vec<_>>()))
            .await
            .unwrap();
    traffic.abort();
    measured(
        "migrate --method storage-version-migration: 30 Secrets",
        started.elapsed(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("secrets: succeeded"), "{out}");
    assert_eq!(secrets_under(&cluster, "v", &new).await, 30);
    let (code, report) = cluster.retirable(&old);
    assert_eq!(code, 0, "{report}");
    check_secrets(&cluster.apiserver.client, "v", &marker, 30).await;
}

fn secret(name: &str) -> k8s_openapi::api::core::v1::Secret {
    k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        string_data: Some([("value".to_string(), "x".to_string())].into()),
        ..Default::default()
    }
}

/// Creates deploy/migrate-rbac.yaml's ClusterRole and binds it to the user `e2e-migrate`.
async fn grant_migrate_role(client: &kube::Client) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/migrate-rbac.yaml")).unwrap();
    let role: ClusterRole = file
        .split("\n---\n")
        .find(|doc| doc.contains("kind: ClusterRole\n"))
        .map(|doc| serde_saphyr::from_str(doc).unwrap())
        .expect("deploy/migrate-rbac.yaml has a ClusterRole");
    let name = role.metadata.name.clone().unwrap();
    kube::Api::<ClusterRole>::all(client.clone())
        .create(&Default::default(), &role)
        .await
        .unwrap();
    let binding = ClusterRoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some("e2e-migrate".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name,
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: "e2e-migrate".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            namespace: None,
        }]),
    };
    kube::Api::<ClusterRoleBinding>::all(client.clone())
        .create(&Default::default(), &binding)
        .await
        .unwrap();
}

//! Two control-plane nodes (a plugin and a kube-apiserver each) on one etcd: the documented
//! multi-node rotation (docs/operations.md), checked step by step with no failed read, then the
//! wrong order, which `migrate`'s preflight refuses.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::*;
use crate::common::etcd::Etcd;
use crate::common::{Dir, Plugin, rand_hex};

/// One node: its plugin's config (rewritten in place, reloaded live), plugin and apiserver.
struct Node {
    name: &'static str,
    config: PathBuf,
    // The apiserver stops before its plugin.
    apiserver: Apiserver,
    plugin: Plugin,
}

/// Writes `node`'s local-backend config: `current` key, `old` keys decrypt-only.
fn write_config(dir: &Dir, node: &str, current: &str, old: &[&str]) -> PathBuf {
    let run = dir.path(&format!("run-{node}"));
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let old: Vec<String> = old
        .iter()
        .map(|k| format!("{:?}", dir.key(k).display().to_string()))
        .collect();
    let text = format!(
        "[probe]\ninterval = \"2s\"\n[reload]\ninterval = \"1s\"\n[socket]\npath = {:?}\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\ndecrypt_only_key_files = [{}]\n",
        run.join("kms.sock").display().to_string(),
        dir.key(current).display().to_string(),
        old.join(", ")
    );
    let path = dir.path(&format!("{node}.toml"));
    let fresh = dir.path(&format!("{node}.toml.new"));
    std::fs::write(&fresh, text).unwrap();
    // Same path, new inode, as editors and ConfigMap symlink swaps do.
    std::fs::rename(fresh, &path).unwrap();
    path
}

impl Node {
    async fn start(dir: &Dir, etcd: &Etcd, name: &'static str, key: &str) -> Node {
        let config = write_config(dir, name, key, &[]);
        let plugin = Plugin::start(&config).await;
        let encryption = encryption_config_named(dir, &plugin.socket, &format!("encryption-{name}.yaml"));
        let apiserver = Apiserver::start_with(dir, etcd, &encryption, &[], name).await;
        Node {
            name,
            config,
            plugin,
            apiserver,
        }
    }

    /// Rewrites the config and waits until the plugin has reloaded it.
    async fn reconfigure(&self, dir: &Dir, current: &str, old: &[&str]) {
        let before = self.plugin.logs().matches("configuration reloaded").count();
        assert_eq!(write_config(dir, self.name, current, old), self.config);
        wait_until(&format!("{} to reload", self.name), Duration::from_secs(30), || async {
            self.plugin.logs().matches("configuration reloaded").count() > before
        })
        .await;
    }

    async fn key_id(&self) -> String {
        crate::common::status(&mut self.plugin.client().await).await.key_id
    }
}

/// Every Secret `<prefix>-*` reads back through both apiservers.
async fn both_read(nodes: &[&Node], prefix: &str, marker: &str, n: usize, step: &str) {
    for node in nodes {
        eprintln!("e2e multinode: {step}: reading {n} Secrets through {}", node.name);
        check_secrets(&node.apiserver.client, prefix, marker, n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn two_nodes_rotate_in_the_documented_order_and_migrate_refuses_the_wrong_one() {
    apiserver_binary();
    let dir = Dir::new();
    let etcd = Etcd::start(&dir).await;
    let a = Node::start(&dir, &etcd, "a", "root-1.key").await;
    let b = Node::start(&dir, &etcd, "b", "root-1.key").await;
    let nodes = [&a, &b];
    let marker = rand_hex(8);
    create_secrets(&a.apiserver.client, "s", &marker, 20).await;
    let old = a.key_id().await;
    both_read(&nodes, "s", &marker, 20, "start").await;

    let migrate = |args: &[&str]| {
        let encryption = dir.path("encryption-a.yaml").display().to_string();
        let mut all = vec![
            "migrate".to_string(),
            format!("--kubeconfig={}", a.apiserver.kubeconfig.display()),
            format!("--encryption-config={encryption}"),
            format!("--apiserver={}", a.apiserver.url),
            format!("--apiserver={}", b.apiserver.url),
        ];
        all.extend(etcd.args());
        all.extend(args.iter().map(|s| s.to_string()));
        plugin_command(&all.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // 1. The new key decrypt-only everywhere; 2. current everywhere.
    for node in nodes {
        node.reconfigure(&dir, "root-1.key", &["root-2.key"]).await;
    }
    both_read(&nodes, "s", &marker, 20, "step 1").await;
    a.reconfigure(&dir, "root-2.key", &["root-1.key"]).await;
    // Between the two nodes switching, what a writes under the new key b reads.
    create_secrets(&a.apiserver.client, "between", &marker, 1).await;
    both_read(&nodes, "between", &marker, 1, "step 2, a switched").await;
    b.reconfigure(&dir, "root-2.key", &["root-1.key"]).await;
    let new = a.key_id().await;
    assert_ne!(new, old);
    assert_eq!(b.key_id().await, new);
    for node in nodes {
        let took = wait_until(
            &format!("apiserver {} to report the new key", node.name),
            Duration::from_secs(150),
            || async { node.apiserver.key_id_hashes().await.contains(&key_id_hash(&new)) },
        )
        .await;
        measured(&format!("multinode: apiserver {} reports the new key", node.name), took);
    }
    both_read(&nodes, "s", &marker, 20, "step 2").await;

    // 3. Migrate (the preflight sees both apiservers agree); 4. verify.
    let (code, out) = migrate(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&a.apiserver.url) && out.contains(&b.apiserver.url),
        "{out}"
    );
    let encryption = dir.path("encryption-a.yaml").display().to_string();
    let mut inventory: Vec<String> = vec!["inventory".into()];
    inventory.extend(etcd.args());
    inventory.extend([
        "--encryption-config".into(),
        encryption,
        "--require-retirable".into(),
        old.clone(),
    ]);
    let (code, report) = plugin_command(&inventory.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{report}");
    // 5. The old key removed everywhere: everything still reads.
    for node in nodes {
        node.reconfigure(&dir, "root-2.key", &[]).await;
    }
    both_read(&nodes, "s", &marker, 20, "step 5").await;

    // The wrong order: a makes root-3 current before b can decrypt with it.
    a.reconfigure(&dir, "root-3.key", &["root-2.key"]).await;
    let third = a.key_id().await;
    wait_until("apiserver a to report root-3", Duration::from_secs(150), || async {
        a.apiserver.key_id_hashes().await.contains(&key_id_hash(&third))
    })
    .await;
    let (code, out) = migrate(&[]);
    eprintln!("e2e multinode: what an operator sees after the wrong order:\n{out}");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&key_id_hash(&third)) && out.contains(&key_id_hash(&new)),
        "the preflight table names both keys:\n{out}"
    );
}

//! Live configuration reload over the built binary: new root keys without a restart, removed
//! keys purged, broken edits refused while calls keep succeeding (SoftHSM2 for PKCS#11).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::softhsm::SoftHsm;
use crate::common::*;
use kms_plugin::proto::v2::StatusRequest;

/// Calls in a loop (Status, Encrypt, Decrypt) until stopped; counts successes and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(plugin: &Plugin, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let mut c = plugin.client().await;
            let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let seed = rand_bytes(32);
                    let result = async {
                        c.status(StatusRequest {}).await?;
                        let e = c
                            .encrypt(kms_plugin::proto::v2::EncryptRequest {
                                plaintext: seed.clone().into(),
                                uid: "load".into(),
                            })
                            .await?
                            .into_inner();
                        let back = c.decrypt(decrypt_request(&e)).await?.into_inner().plaintext;
                        assert_eq!(back.to_vec(), seed);
                        Ok::<_, tonic::Status>(())
                    }
                    .await;
                    match result {
                        Ok(()) => ok.fetch_add(1, Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(format!("{e:?}"));
                            failed.fetch_add(1, Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        Load {
            stop,
            ok,
            failed,
            errors,
            tasks,
        }
    }

    /// Stops the load and asserts that it made calls and none failed.
    async fn finish(self) {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let (ok, failed) = (self.ok.load(Relaxed), self.failed.load(Relaxed));
        assert!(ok > 10, "the load made only {ok} rounds");
        assert_eq!(
            failed,
            0,
            "failed calls under reload: {:?}",
            self.errors.lock().unwrap()
        );
    }
}

fn local_config(dir: &Dir, current: &str, old: &[&str], extra: &str) -> String {
    let old: Vec<String> = old
        .iter()
        .map(|k| format!("{:?}", dir.key(k).display().to_string()))
        .collect();
    format!(
        "{extra}\n[reload]\ninterval = \"200ms\"\n[socket]\npath = {:?}\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\ndecrypt_only_key_files = [{}]\n",
        dir.socket(),
        dir.key(current).display().to_string(),
        old.join(", ")
    )
}

async fn reloads(plugin: &Plugin, outcome: &str) -> f64 {
    plugin
        .metric(&format!("kms_plugin_config_reloads_total{{outcome=\"{outcome}\"}}"))
        .await
}

/// Waits until the reload counter for `outcome` reaches `n`.
async fn wait_reloads(plugin: &Plugin, outcome: &str, n: f64) {
    eventually(&format!("{outcome} reload #{n}"), || async {
        reloads(plugin, outcome).await >= n
    })
    .await;
}

/// Rewrites `path` in place (a new inode, as editors and `kubectl cp` do).
fn rewrite(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_new_local_root_key_becomes_current_without_a_restart() {
    let dir = Dir::new();
    let config = dir.path("config.toml");
    std::fs::write(&config, local_config(&dir, "a.key", &[], "")).unwrap();
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let a = status(&mut c).await.key_id;
    let seed = rand_bytes(32);
    let old = encrypt(&mut c, &seed).await;
    let load = Load::start(&plugin, 4).await;

    // Phase 1: the new key as decrypt-only (a file change, noticed by polling).
    rewrite(&config, &local_config(&dir, "a.key", &["b.key"], ""));
    wait_reloads(&plugin, "success", 1.0).await;
    assert_eq!(
        status(&mut c).await.key_id,
        a,
        "a decrypt-only key does not change the key_id"
    );
    // Phase 2: make it current (SIGHUP this time).
    std::fs::write(&config, local_config(&dir, "b.key", &["a.key"], "")).unwrap();
    plugin.signal("HUP");
    wait_reloads(&plugin, "success", 2.0).await;
    let b = status(&mut c).await.key_id;
    assert_ne!(b, a);
    let e = encrypt(&mut c, &rand_bytes(32)).await;
    assert_eq!(e.key_id, b);
    assert_eq!(decrypt(&mut c, &old).await.unwrap(), seed);
    // Key a is still configured: its KEK stayed cached through both reloads, no unwrap.
    assert_eq!(plugin.backend_calls("unwrap").await, 0);
    assert!(plugin.logs().contains("configuration reloaded"));
    load.finish().await;

    // Removing the old key: its ciphertexts are NotFound and its cached KEK is gone.
    let cached = plugin.metric("kms_plugin_kek_cache_size ").await;
    std::fs::write(&config, local_config(&dir, "b.key", &[], "")).unwrap();
    plugin.signal("HUP");
    wait_reloads(&plugin, "success", 3.0).await;
    assert_eq!(decrypt(&mut c, &old).await.unwrap_err().code(), Code::NotFound);
    assert!(plugin.metric("kms_plugin_kek_cache_size ").await < cached);
    assert!(plugin.logs().contains("of removed keys purged"));
    plugin.stop().await;
}

#[tokio::test]
async fn broken_edits_are_refused_and_the_old_config_keeps_serving() {
    let dir = Dir::new();
    let config = dir.path("config.toml");
    let good = local_config(&dir, "a.key", &[], "");
    std::fs::write(&config, &good).unwrap();
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let a = status(&mut c).await.key_id;
    let load = Load::start(&plugin, 4).await;

    let open = dir.key("open.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let broken = [
        (good.replace("[reload]", "typo = 1\n[reload]"), "typo"),
        (
            good.replace(&dir.key("a.key").display().to_string(), "/no/such/key"),
            "/no/such/key",
        ),
        (
            good.replace(&dir.key("a.key").display().to_string(), &open.display().to_string()),
            "readable or writable by group or others",
        ),
        (good.replace("[socket]\n", "[socket]\nmode = \"0660\"\n"), "socket.mode"),
    ];
    for (i, (text, reason)) in broken.iter().enumerate() {
        rewrite(&config, text);
        wait_reloads(&plugin, "failure", (i + 1) as f64).await;
        assert!(
            plugin.wait_log(reason).await,
            "no log naming {reason:?}:\n{}",
            plugin.logs()
        );
        assert_eq!(status(&mut c).await.key_id, a);
    }
    rewrite(&config, &good);
    // Unchanged content back: nothing new in force, but the fixed file reloads cleanly.
    plugin.signal("HUP");
    wait_reloads(&plugin, "success", 1.0).await;
    assert_eq!(status(&mut c).await.key_id, a);
    assert_eq!(plugin.metric("kms_plugin_healthy ").await, 1.0);
    load.finish().await;
    plugin.stop().await;
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_noticed() {
    let dir = Dir::new();
    // kubelet's layout: config.toml -> ..data/config.toml, ..data -> ..<timestamp>
    let v1 = dir.path("..2026_01");
    let v2 = dir.path("..2026_02");
    std::fs::create_dir(&v1).unwrap();
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v1.join("config.toml"), local_config(&dir, "a.key", &[], "")).unwrap();
    std::fs::write(v2.join("config.toml"), local_config(&dir, "b.key", &["a.key"], "")).unwrap();
    std::os::unix::fs::symlink("..2026_01", dir.path("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.toml", dir.path("config.toml")).unwrap();
    let plugin = Plugin::start(&dir.path("config.toml")).await;
    let mut c = plugin.client().await;
    let a = status(&mut c).await.key_id;
    // The atomic swap: a new ..data link renamed over the old one.
    std::os::unix::fs::symlink("..2026_02", dir.path("..data_tmp")).unwrap();
    std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
    wait_reloads(&plugin, "success", 1.0).await;
    assert_ne!(status(&mut c).await.key_id, a);
    plugin.stop().await;
}

#[tokio::test]
async fn twenty_reloads_under_load_fail_no_call() {
    let dir = Dir::new();
    let config = dir.path("config.toml");
    std::fs::write(&config, local_config(&dir, "a.key", &["b.key"], "")).unwrap();
    let plugin = Plugin::start(&config).await;
    let load = Load::start(&plugin, 8).await;
    for i in 0..20 {
        // Alternate the current key, and the KEK policy with it.
        let (current, old) = if i % 2 == 0 {
            ("b.key", "a.key")
        } else {
            ("a.key", "b.key")
        };
        let extra = format!("[kek]\nmax_uses = {}", 1000 + i);
        std::fs::write(&config, local_config(&dir, current, &[old], &extra)).unwrap();
        plugin.signal("HUP");
        wait_reloads(&plugin, "success", (i + 1) as f64).await;
    }
    load.finish().await;
    assert_eq!(reloads(&plugin, "failure").await, 0.0);
    plugin.stop().await;
}

#[tokio::test]
async fn pkcs11_a_new_hsm_key_becomes_current_and_a_missing_label_is_refused() {
    let dir = Dir::new();
    let hsm = SoftHsm::new(&dir);
    hsm.keygen("root-1");
    hsm.keygen("root-2");
    let env = hsm.env();
    let write = |current: &str, old: &[&str]| {
        let path = hsm.config(&dir, current, old, &hsm.pin_file, "[reload]\ninterval = \"200ms\"");
        std::fs::read_to_string(path).unwrap()
    };
    let config = dir.path("hsm.toml");
    std::fs::write(&config, write("root-1", &[])).unwrap();
    let plugin = Plugin::start_env(&config, &env).await;
    let mut c = plugin.client().await;
    let k1 = status(&mut c).await.key_id;
    let seed = rand_bytes(32);
    let old = encrypt(&mut c, &seed).await;
    let load = Load::start(&plugin, 4).await;

    // A label the token does not have: refused, the old key keeps serving.
    rewrite(&config, &write("root-3", &["root-1"]));
    wait_reloads(&plugin, "failure", 1.0).await;
    assert!(plugin.wait_log("root-3").await);
    assert_eq!(status(&mut c).await.key_id, k1);

    rewrite(&config, &write("root-2", &["root-1"]));
    wait_reloads(&plugin, "success", 1.0).await;
    let k2 = status(&mut c).await.key_id;
    assert_ne!(k2, k1);
    assert_eq!(encrypt(&mut c, &rand_bytes(32)).await.key_id, k2);
    assert_eq!(decrypt(&mut c, &old).await.unwrap(), seed);
    load.finish().await;
    plugin.stop().await;
}

/// Makes `path` a sparse file of `len` bytes that starts with `text` (the rest reads as zeros):
/// huge, yet nothing to write to disk.
fn sparse(path: &Path, text: &str, len: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.set_len(len).unwrap();
}

#[tokio::test]
async fn an_oversize_file_is_refused_unread_while_decrypts_go_on() {
    const BIG: u64 = 300 << 20;
    let dir = Dir::new();
    let config = dir.path("config.toml");
    let good = local_config(&dir, "a.key", &[], "");
    std::fs::write(&config, &good).unwrap();
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let a = status(&mut c).await.key_id;
    let e = encrypt(&mut c, b"seed").await;

    // Decrypts in a loop (the plugin serves on one async worker), each timed.
    let stop = Arc::new(AtomicBool::new(false));
    let decrypts = {
        let (mut c, stop) = (plugin.client().await, stop.clone());
        tokio::spawn(async move {
            let (mut rounds, mut slowest, mut failures) = (0u64, Duration::ZERO, Vec::new());
            while !stop.load(Relaxed) {
                let started = Instant::now();
                match tokio::time::timeout(Duration::from_secs(5), c.decrypt(decrypt_request(&e))).await {
                    Ok(Ok(r)) if r.get_ref().plaintext.as_ref() == b"seed" => {}
                    other => failures.push(format!("{other:?}")),
                }
                slowest = slowest.max(started.elapsed());
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (rounds, slowest, failures)
        })
    };

    // A 300 MiB config file (the good one, then zeros), swapped in and signalled; the poll
    // sees it too, every 200 ms.
    let big = dir.path("big.toml");
    sparse(&big, &good, BIG);
    std::fs::rename(&big, &config).unwrap();
    plugin.signal("HUP");
    wait_reloads(&plugin, "failure", 1.0).await;
    let why = format!(
        "config file {} is {BIG} bytes, over the limit of 1048576 bytes",
        config.display()
    );
    assert!(plugin.wait_log(&why).await, "no log {why:?}:\n{}", plugin.logs());
    // Several polls over the big file: the change was tried once, not every interval.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = reloads(&plugin, "failure").await;
    assert!(
        failed <= 2.0,
        "{failed} refused reloads for one change (SIGHUP and poll at most)"
    );

    // A file the config names, over the cap: refused the same way, naming it.
    let key = dir.key("big.key");
    sparse(&key, "", BIG);
    rewrite(&config, &local_config(&dir, "a.key", &["big.key"], ""));
    wait_reloads(&plugin, "failure", failed + 1.0).await;
    let why = format!("file {} is {BIG} bytes, over the limit of 1048576 bytes", key.display());
    assert!(plugin.wait_log(&why).await, "no log {why:?}:\n{}", plugin.logs());

    stop.store(true, Relaxed);
    let (rounds, slowest, failures) = decrypts.await.unwrap();
    let (_, peak_kib) = plugin.memory_kib();
    assert!(rounds > 10, "only {rounds} Decrypts");
    assert!(failures.is_empty(), "failed Decrypts: {failures:?}");
    assert!(slowest < Duration::from_secs(1), "slowest Decrypt took {slowest:?}");
    // Reading either file whole would have taken 300 MiB at least.
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
    assert_eq!(status(&mut c).await.key_id, a);
    assert!(plugin.logs().contains("the previous configuration keeps serving"));
    plugin.stop().await;
}

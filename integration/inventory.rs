//! `kms-plugin inventory` against a real etcd holding values in the apiserver's exact storage
//! formats, with KMS v2 seeds sealed by the running plugin.

use std::process::{Child, Command};
use std::sync::Mutex;

use kms_plugin::inventory::etcd::pb::etcdserverpb::{RangeResponse, ResponseHeader};
use kms_plugin::inventory::etcd::pb::mvccpb::KeyValue;
use kms_plugin::inventory::format::EncryptedObject;
use kms_plugin::logging::KeyIdHash;
use kms_plugin::proto::v2::EncryptResponse;
use prost::Message;
use serde_json::Value;

use crate::common::etcd::{Etcd, FakeEtcd};
use crate::common::{BIN, Dir, Plugin, encrypt, eventually, rand_bytes, status};

/// The value the apiserver stores for an object sealed under `seed` (contract §7).
fn kms_v2_value(provider: &str, seed: &EncryptResponse) -> Vec<u8> {
    let object = EncryptedObject {
        encrypted_data: rand_bytes(48),
        key_id: seed.key_id.clone(),
        encrypted_dek_source: seed.ciphertext.to_vec(),
        annotations: seed.annotations.iter().map(|(k, v)| (k.clone(), v.to_vec())).collect(),
        encrypted_dek_source_type: 1,
    };
    let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
    v.extend(object.encode_to_vec());
    v
}

/// Runs the inventory: (exit code, stdout, stderr).
fn inventory(etcd: &Etcd, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("inventory")
        .args(etcd.args())
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(etcd: &Etcd, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = inventory(etcd, &args);
    let doc = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: exit {code}\n{out}\n{err}"));
    (code, doc)
}

/// Seeds sealed by a freshly started plugin on `config` (one local KEK per start).
async fn seeds(config: &std::path::Path, n: usize) -> (String, Vec<EncryptResponse>) {
    let plugin = Plugin::start(config).await;
    let mut c = plugin.client().await;
    let key_id = status(&mut c).await.key_id;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(encrypt(&mut c, &rand_bytes(32)).await);
    }
    plugin.stop().await;
    (key_id, out)
}

#[tokio::test]
async fn counts_verify_and_retirement_over_a_realistic_mix() {
    let dir = Dir::new();
    let etcd = Etcd::start(&dir).await;
    let socket = dir.socket();
    let old = dir.config(&socket, "root-1.key", &[], "");
    let rotated = dir.config(&socket, "root-2.key", &["root-1.key"], "");
    let new_only = dir.config(&socket, "root-2.key", &[], "");

    // Root key 1: two plugin starts, so two local KEKs; three seeds.
    let (k1, a) = seeds(&old, 2).await;
    let (k1_again, b) = seeds(&old, 1).await;
    assert_eq!(k1, k1_again);
    // Root key 2 after rotation: one KEK, two seeds.
    let (k2, c) = seeds(&rotated, 2).await;
    assert_ne!(k1, k2);

    let p = "kms-plugin";
    let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
    // 9 objects under k1 (seeds a0 ×4, a1 ×3, b0 ×2).
    for (i, seed) in [
        (0, &a[0]),
        (1, &a[0]),
        (2, &a[0]),
        (3, &a[0]),
        (4, &a[1]),
        (5, &a[1]),
        (6, &a[1]),
    ] {
        puts.push((format!("/registry/secrets/default/old-{i}"), kms_v2_value(p, seed)));
    }
    puts.push(("/registry/secrets/kube-system/old-7".into(), kms_v2_value(p, &b[0])));
    puts.push(("/registry/secrets/kube-system/old-8".into(), kms_v2_value(p, &b[0])));
    // 4 under k2: c0 ×2, c1 ×1 (a configmap), and one whose sealed seed was tampered with.
    puts.push(("/registry/secrets/default/new-0".into(), kms_v2_value(p, &c[0])));
    puts.push(("/registry/secrets/default/new-1".into(), kms_v2_value(p, &c[0])));
    puts.push(("/registry/configmaps/default/new-2".into(), kms_v2_value(p, &c[1])));
    let mut tampered = c[0].clone();
    let mut ct = tampered.ciphertext.to_vec();
    ct[20] ^= 1;
    tampered.ciphertext = ct.into();
    puts.push(("/registry/secrets/default/tampered".into(), kms_v2_value(p, &tampered)));
    // A KMS v2 object of another plugin (foreign key_id, no KEK annotation).
    let foreign = EncryptResponse {
        ciphertext: rand_bytes(40).into(),
        key_id: "arn:aws:kms:eu-west-1:111122223333:key/other".into(),
        annotations: Default::default(),
    };
    puts.push((
        "/registry/secrets/default/foreign".into(),
        kms_v2_value("other-kms", &foreign),
    ));
    // Other formats and identity.
    puts.push((
        "/registry/secrets/default/cbc".into(),
        b"k8s:enc:aescbc:v1:key1:\x01\x02".to_vec(),
    ));
    puts.push((
        "/registry/configmaps/default/sb".into(),
        b"k8s:enc:secretbox:v1:k:\x01".to_vec(),
    ));
    puts.push((
        "/registry/secrets/default/plain".into(),
        b"k8s\0\n\x0c\n\x02v1\x12\x06Secret".to_vec(),
    ));
    puts.push(("/registry/secrets/default/plain-2".into(), b"k8s\0\n\x02".to_vec()));
    for i in 0..2 {
        puts.push((
            format!("/registry/widgets.example.com/default/w{i}"),
            br#"{"apiVersion":"example.com/v1","kind":"Widget"}"#.to_vec(),
        ));
    }
    // Corrupt: a KMS v2 prefix over garbage, and bytes in no format at all.
    puts.push((
        "/registry/secrets/default/corrupt".into(),
        b"k8s:enc:kms:v2:kms-plugin:\xff\xff\xff\x01".to_vec(),
    ));
    puts.push(("/registry/events/default/junk".into(), vec![0x00, 0x9f, 0x42]));
    // Outside the prefix: never counted.
    puts.push(("/other/secrets/x".into(), kms_v2_value(p, &a[0])));
    for (k, v) in &puts {
        etcd.put(k.as_bytes(), v).await;
    }

    // Without --verify.
    // Pages of 3 keys: the scan crosses page boundaries (and one page holds `/other/`'s
    // neighbour range end) and still counts every key once.
    let (code, doc) = json(&etcd, &["--page-size", "3"]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["keys_scanned"], 22);
    let secrets = &doc["resources"]["secrets"];
    assert_eq!(secrets["objects"], 17);
    assert_eq!(secrets["kms_v2"][p][&k1], 9);
    assert_eq!(secrets["kms_v2"][p][&k2], 3);
    assert_eq!(secrets["kms_v2"]["other-kms"][&foreign.key_id], 1);
    assert_eq!(secrets["other_encryption"]["aescbc"], 1);
    assert_eq!(secrets["not_encrypted"]["protobuf"], 2);
    assert_eq!(secrets["unknown"], 1);
    assert_eq!(doc["resources"]["configmaps"]["other_encryption"]["secretbox"], 1);
    assert_eq!(doc["resources"]["configmaps"]["kms_v2"][p][&k2], 1);
    assert_eq!(doc["resources"]["widgets.example.com"]["not_encrypted"]["json"], 2);
    assert_eq!(doc["resources"]["events"]["unknown"], 1);
    assert_eq!(doc["unknown"]["count"], 2);
    let k1_doc = &doc["key_ids"][&k1];
    assert_eq!(k1_doc["key_id_hash"], KeyIdHash(&k1).to_string());
    assert_eq!(
        (
            &k1_doc["objects"],
            &k1_doc["sealed_by_this_plugin"],
            &k1_doc["dek_sources"],
            &k1_doc["local_keks"]
        ),
        (&9.into(), &9.into(), &3.into(), &2.into())
    );
    assert_eq!(k1_doc["retirable"], false);
    let k2_doc = &doc["key_ids"][&k2];
    assert_eq!(
        (&k2_doc["objects"], &k2_doc["dek_sources"], &k2_doc["local_keks"]),
        (&4.into(), &3.into(), &1.into())
    );
    assert_eq!(doc["key_ids"][&foreign.key_id]["sealed_by_this_plugin"], 0);
    assert!(doc["key_ids"][&k1].get("verify").is_none());

    // --verify with the rotated configuration: every distinct seed opened exactly once.
    let (code, doc) = json(&etcd, &["--verify", "--config", rotated.to_str().unwrap()]);
    assert_eq!(code, 3, "objects that do not open: exit 3; {doc}");
    assert_eq!(doc["seeds_opened"], 7, "a0 a1 b0 c0 c1 tampered foreign");
    assert_eq!(doc["key_ids"][&k1]["verify"]["open"], 9);
    assert_eq!(doc["key_ids"][&k1]["verify"]["do_not_open"]["count"], 0);
    let v2 = &doc["key_ids"][&k2]["verify"];
    assert_eq!(v2["open"], 3);
    assert_eq!(
        v2["do_not_open"]["keys"],
        serde_json::json!(["/registry/secrets/default/tampered"])
    );
    assert_eq!(v2["reasons"]["ciphertext failed authentication"], 1);
    assert_eq!(
        doc["key_ids"][&foreign.key_id]["verify"]["reasons"]["not sealed by this plugin"],
        1
    );

    // The table says it in words, and prints no value bytes.
    let (code, table, _) = inventory(&etcd, &["--verify", "--config", rotated.to_str().unwrap()]);
    assert_eq!(code, 3);
    assert!(table.contains("all 9 objects open with this configuration"), "{table}");
    assert!(table.contains("1 of 4 objects do NOT open"), "{table}");
    assert!(table.contains(&KeyIdHash(&k2).to_string()), "{table}");
    let wrapped = &a[0].annotations[kms_plugin::contract::KEK_ANNOTATION];
    assert!(!table.contains(&hex::encode(wrapped)) && !table.contains(&hex::encode(&a[0].ciphertext)));

    // What retiring root-1 would do: with it removed, its 9 objects no longer open.
    let (code, doc) = json(&etcd, &["--verify", "--config", new_only.to_str().unwrap()]);
    assert_eq!(code, 3);
    assert_eq!(doc["key_ids"][&k1]["verify"]["do_not_open"]["count"], 9);
    assert_eq!(
        doc["key_ids"][&k1]["verify"]["reasons"]["key_id not in this configuration"],
        9
    );

    // --require-retirable, in both forms: objects remain under k1.
    let hash1 = KeyIdHash(&k1).to_string();
    for form in [&k1, &hash1] {
        let (code, doc) = json(&etcd, &["--provider", p, "--require-retirable", form]);
        assert_eq!(code, 2, "{doc}");
        let r = &doc["require_retirable"];
        assert_eq!(
            (&r["key_id"], &r["key_id_hash"], &r["objects"]),
            (&k1.as_str().into(), &hash1.as_str().into(), &9.into())
        );
        assert_eq!(r["retirable"], false);
    }

    // Storage migration: every k1 object rewritten under k2. Now k1 may go.
    for (k, _) in puts.iter().filter(|(k, _)| k.contains("/old-")) {
        etcd.put(k.as_bytes(), &kms_v2_value(p, &c[1])).await;
    }
    let (code, table, _) = inventory(&etcd, &["--provider", p, "--require-retirable", &hash1]);
    assert_eq!(code, 0, "{table}");
    assert!(
        table.contains(&format!("--require-retirable {hash1}")) && table.contains("retirable, no object"),
        "{table}"
    );
    let (code, doc) = json(&etcd, &["--provider", p, "--require-retirable", &k1]);
    assert_eq!(code, 0);
    assert!(doc["key_ids"].get(&k1).is_none());
    assert_eq!(doc["require_retirable"]["key_id_hash"], hash1.as_str());
    // k2 still holds objects.
    let (code, _, _) = inventory(&etcd, &["--provider", p, "--require-retirable", &k2]);
    assert_eq!(code, 2);
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let dir = Dir::new();
    let etcd = Etcd::start_tls(&dir).await;
    etcd.put(b"/registry/secrets/default/a", b"k8s\0\n\x02").await;
    etcd.put(b"/registry/secrets/default/b", b"k8s:enc:aesgcm:v1:k:\x01")
        .await;
    let (code, doc) = json(&etcd, &[]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["resources"]["secrets"]["objects"], 2);
    assert_eq!(doc["resources"]["secrets"]["other_encryption"]["aesgcm"], 1);

    // Without the client certificate etcd refuses: exit 1 with the reason, no report.
    let pki = etcd.pki.as_ref().unwrap();
    let out = Command::new(BIN)
        .args([
            "inventory",
            "--endpoints",
            &etcd.endpoint,
            "--cacert",
            pki.ca.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn unreachable_etcd_and_bad_flags_are_errors() {
    let dir = Dir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(BIN)
        .args(["inventory", "--endpoints", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no etcd endpoint answered"),
        "{out:?}"
    );
    // --verify without --config is refused by the CLI.
    let out = Command::new(BIN).args(["inventory", "--verify"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    drop(dir);
}

/// `scripts/inventory-bench.sh`: INVENTORY_BENCH_OBJECTS (default 200,000) objects, 90% KMS
/// v2 Secrets of ~1 KiB over 4 seeds, the rest identity; reports objects/s and peak RSS of
/// `kms-plugin inventory`, without and with --verify.
#[tokio::test]
#[ignore = "benchmark: run by scripts/inventory-bench.sh"]
async fn inventory_bench() {
    let n: usize = std::env::var("INVENTORY_BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = Dir::new();
    let etcd = Etcd::start(&dir).await;
    let config = dir.config(&dir.socket(), "root-1.key", &[], "");
    let (_, sealed) = seeds(&config, 4).await;
    let started = std::time::Instant::now();
    let values = (0..n).map(|i| match i % 20 {
        0 => (
            format!("/registry/configmaps/ns-{}/cm-{i}", i % 100),
            b"k8s\0\n\x02".repeat(200),
        ),
        1 => (
            format!("/registry/widgets.example.com/ns/w-{i}"),
            br#"{"kind":"Widget"}"#.repeat(50),
        ),
        _ => {
            // A ~1 KiB Secret: the sealed object is the bulk of the value.
            let v = kms_v2_value("kms-plugin", &sealed[i % sealed.len()]);
            let prefix = b"k8s:enc:kms:v2:kms-plugin:".len();
            let mut object = EncryptedObject::decode(&v[prefix..]).unwrap();
            object.encrypted_data = vec![0x5a; 1024];
            let mut value = v[..prefix].to_vec();
            value.extend(object.encode_to_vec());
            (format!("/registry/secrets/ns-{}/s-{i}", i % 100), value)
        }
    });
    etcd.put_many(values.map(|(k, v)| (k.into_bytes(), v)), 128).await;
    let put_secs = started.elapsed().as_secs_f64();
    println!("inventory_bench: wrote {n} objects in {put_secs:.1} s");
    let config_arg = config.display().to_string();
    let page = std::env::var("INVENTORY_BENCH_PAGE").unwrap_or_else(|_| kms_plugin::inventory::etcd::PAGE.to_string());
    for extra in [vec![], vec!["--verify", "--config", config_arg.as_str()]] {
        let started = std::time::Instant::now();
        let out = Command::new("/usr/bin/time")
            .args([
                "-f",
                "maxrss_kib=%M",
                BIN,
                "inventory",
                "--json",
                "--endpoints",
                &etcd.endpoint,
            ])
            .args(["--page-size", &page])
            .args(&extra)
            .output()
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["keys_scanned"], n as u64);
        let rss = stderr
            .lines()
            .find_map(|l| l.strip_prefix("maxrss_kib="))
            .unwrap_or("?");
        println!(
            "inventory_bench: inventory --page-size {page} {:?}: {n} objects in {secs:.2} s = {:.0} objects/s, peak RSS {rss} KiB",
            extra.first().unwrap_or(&"(no --verify)"),
            n as f64 / secs
        );
    }
}

#[tokio::test]
async fn progress_goes_to_stderr_and_the_table_to_stdout() {
    let dir = Dir::new();
    let etcd = Etcd::start(&dir).await;
    let values = (0..10_050).map(|i| {
        (
            format!("/registry/configmaps/ns/cm-{i:05}").into_bytes(),
            b"k8s\0\n\x02".to_vec(),
        )
    });
    etcd.put_many(values, 64).await;
    let (code, out, err) = inventory(&etcd, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("10000 keys scanned"), "{err}");
    assert!(!out.contains("keys scanned"));
    assert!(
        out.contains("10050 objects") && out.contains("not encrypted (protobuf): 10050"),
        "{out}"
    );
    assert!(out.contains("no KMS v2 objects"), "{out}");
}

/// A running inventory, killed if the test ends (or fails) before it does: a scan that never
/// ends must fail the test, not outlive it.
struct Running(Mutex<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        let child = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs the inventory against `endpoint`; the test fails if it has not exited within
/// `eventually`'s limit: (exit code, stdout, stderr).
async fn inventory_bounded(dir: &Dir, endpoint: &str) -> (i32, String, String) {
    let (out, err) = (dir.path("inventory.out"), dir.path("inventory.err"));
    let running = Running(Mutex::new(
        Command::new(BIN)
            .args(["inventory", "--endpoints", endpoint])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    ));
    eventually("inventory to exit", || async {
        running.0.lock().unwrap().try_wait().unwrap().is_some()
    })
    .await;
    // Exited: `wait` returns the status `try_wait` saw.
    let status = running.0.lock().unwrap().wait().unwrap();
    let read = |p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
    (status.code().unwrap_or(-1), read(&out), read(&err))
}

#[tokio::test]
async fn etcd_paging_that_does_not_advance_is_an_error() {
    let dir = Dir::new();
    let header = || {
        Some(ResponseHeader {
            revision: 7,
            ..Default::default()
        })
    };
    // Every page: the same (long, hostile) key and "more follow", so the next page never starts
    // past it.
    let key = [b"/registry/secrets/\x1b]0;pwned\x07".as_slice(), &[b'x'; 100_000]].concat();
    let stuck = FakeEtcd::start(move |_| RangeResponse {
        header: header(),
        kvs: vec![KeyValue {
            key: key.clone(),
            value: b"k8s\0\n\x02".to_vec(),
            ..Default::default()
        }],
        more: true,
        count: 2,
    })
    .await;
    let (code, out, err) = inventory_bounded(&dir, &stuck.endpoint).await;
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "no report from a scan that did not finish");
    assert!(
        err.contains(r"etcd paging did not advance at key /registry/secrets/\u{1b}]0;pwned\u{7}xxx"),
        "{err}"
    );
    assert!(
        err.contains("etcd answered it again")
            && err.contains("…(100,028 bytes, sha256:")
            && err.len() < 2_000
            && !err.contains('\x1b'),
        "{err:?}"
    );

    // An empty page that says more follow: not the end of the scan.
    let empty = FakeEtcd::start(move |_| RangeResponse {
        header: header(),
        kvs: vec![],
        more: true,
        count: 1,
    })
    .await;
    let (code, out, err) = inventory_bounded(&dir, &empty.endpoint).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("etcd paging did not advance at key /registry/: an empty page said more keys follow"),
        "{err}"
    );
}

#[tokio::test]
async fn huge_and_hostile_names_are_cut_and_escaped_but_counted_in_full() {
    let dir = Dir::new();
    let etcd = Etcd::start(&dir).await;
    // 100,000-byte key_ids that differ only in their last byte: two key_ids, two rows.
    let head = "evil\n\x1b[2Jforged line";
    let id = |last: char| format!("{head}{}{last}", "k".repeat(100_000 - head.len() - 1));
    let provider = format!("p\r{}", "q".repeat(499_998));
    let value = |key_id: String| {
        let object = EncryptedObject {
            encrypted_data: vec![1; 16],
            key_id,
            encrypted_dek_source: vec![2; 32],
            annotations: Default::default(),
            encrypted_dek_source_type: 1,
        };
        let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
        v.extend(object.encode_to_vec());
        v
    };
    etcd.put(b"/registry/secrets/default/a", &value(id('1'))).await;
    etcd.put(b"/registry/secrets/default/b", &value(id('2'))).await;
    etcd.put(b"/registry/secrets/default/c", &value(id('2'))).await;
    // A long resource name with a terminal escape, and its key listed as unknown.
    let key = format!("/registry/w\x1b{}/ns/x", "r".repeat(50_000));
    etcd.put(key.as_bytes(), b"\x00junk").await;

    let (code, table, err) = inventory(&etcd, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(table.len() < 20_000, "{} bytes", table.len());
    assert!(table.contains("4 objects"), "{table}");
    assert!(table.contains(r"evil\u{a}\u{1b}[2Jforged line") && table.contains("…(100,000 bytes, sha256:"));
    assert!(table.contains(r"p\u{d}qqq") && table.contains("…(500,000 bytes, sha256:"));
    assert!(table.contains(r"w\u{1b}rrr") && table.contains("…(50,002 bytes, sha256:"));
    assert_eq!(
        table.lines().filter(|l| l.starts_with("key_id evil")).count(),
        2,
        "{table}"
    );
    assert!(!table.contains(['\x1b', '\r']) && !table.lines().any(|l| l.starts_with("forged")));

    let (code, out, err) = inventory(&etcd, &["--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.len() < 20_000, "{} bytes", out.len());
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["keys_scanned"], 4);
    let ids = doc["key_ids"].as_object().unwrap();
    assert_eq!(ids.len(), 2, "{doc}");
    let mut objects: Vec<u64> = ids.values().map(|k| k["objects"].as_u64().unwrap()).collect();
    objects.sort();
    assert_eq!(objects, [1, 2]);
    for (shown, k) in ids {
        assert_eq!(shown, k["key_id"].as_str().unwrap());
        assert!(shown.starts_with(r"evil\u{a}\u{1b}[2Jforged line") && shown.contains("…(100,000 bytes, sha256:"));
        // The digest in the cut form starts the key_id's hash.
        let hash = k["key_id_hash"].as_str().unwrap();
        assert!(shown.ends_with(&format!("sha256:{})", &hash[7..23])), "{shown} {hash}");
        assert!(k["providers"][0].as_str().unwrap().contains("…(500,000 bytes"));
    }
    let secrets = &doc["resources"]["secrets"]["kms_v2"];
    let (p, by_id) = secrets.as_object().unwrap().iter().next().unwrap();
    assert!(
        p.starts_with(r"p\u{d}qqq") && by_id.as_object().unwrap().len() == 2,
        "{secrets}"
    );
    let unknown = doc["unknown"]["keys"][0].as_str().unwrap();
    assert!(
        unknown.starts_with(r"/registry/w\u{1b}rrr") && unknown.contains("…(50,017 bytes"),
        "{unknown}"
    );

    // --require-retirable finds the full key_id by its hash and shows it cut. The provider
    // name (too long for a command line) comes from an EncryptionConfiguration.
    let encryption = dir.path("encryption-config.json");
    std::fs::write(
        &encryption,
        serde_json::json!({"kind": "EncryptionConfiguration", "resources": [{"resources": ["secrets"],
            "providers": [{"kms": {"apiVersion": "v2", "name": provider}}]}]})
        .to_string(),
    )
    .unwrap();
    let encryption = encryption.to_str().unwrap();
    let (code, out, _) = inventory(
        &etcd,
        &[
            "--json",
            "--encryption-config",
            encryption,
            "--require-retirable",
            &KeyIdHash(&id('2')).to_string(),
        ],
    );
    assert_eq!(code, 2);
    assert!(out.len() < 20_000);
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["require_retirable"]["objects"], 2);
    assert!(
        doc["require_retirable"]["key_id"]
            .as_str()
            .unwrap()
            .contains("…(100,000 bytes")
    );
    // Verdicts compare full values: by the full key_id's hash (1 object), and a key_id shown
    // alike (same first bytes and length) that no object names.
    let hash = |c: char| KeyIdHash(&id(c)).to_string();
    let (code, out, _) = inventory(
        &etcd,
        &["--encryption-config", encryption, "--require-retirable", &hash('1')],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("objects: NOT retirable") && out.len() < 20_000, "{out}");
    let (code, out, _) = inventory(
        &etcd,
        &["--encryption-config", encryption, "--require-retirable", &hash('3')],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("0 objects: retirable") && out.contains("never seen"),
        "{out}"
    );
    // Such a key_id is not this plugin's form: refused, never judged.
    let (code, _, err) = inventory(
        &etcd,
        &["--encryption-config", encryption, "--require-retirable", &id('1')],
    );
    assert_eq!(code, 1, "{err}");
}

/// `--require-retirable` fails closed: every near miss of a key_id is refused, and a scan that
/// found nothing of the provider (wrong prefix, wrong provider, empty etcd) is no verdict.
#[tokio::test]
async fn the_retirement_verdict_fails_closed() {
    let dir = Dir::new();
    let etcd = Etcd::start(&dir).await;
    let socket = dir.socket();
    let old = dir.config(&socket, "root-1.key", &[], "");
    let rotated = dir.config(&socket, "root-2.key", &["root-1.key"], "");
    let new_only = dir.config(&socket, "root-2.key", &[], "");
    let (k1, a) = seeds(&old, 1).await;
    let (k2, _) = seeds(&rotated, 1).await;
    let p = "kms-plugin";
    for i in 0..3 {
        etcd.put(
            format!("/registry/secrets/default/s-{i}").as_bytes(),
            &kms_v2_value(p, &a[0]),
        )
        .await;
    }
    etcd.put(b"/registry/secrets/default/plain", b"k8s\0\n\x02").await;
    etcd.put(
        b"/registry/configmaps/default/other",
        &kms_v2_value("someone-else", &a[0]),
    )
    .await;
    let hash1 = KeyIdHash(&k1).to_string();
    let hex1 = hash1.strip_prefix("sha256:").unwrap();

    // Near misses: refused, naming the accepted forms.
    for bad in [
        hex1.to_string(),
        format!("SHA256:{}", hex1.to_uppercase()),
        "sha256:deadbeef".to_string(),
        format!(" {k1}"),
    ] {
        let (code, out, err) = inventory(&etcd, &["--provider", p, "--require-retirable", &bad]);
        assert_eq!(code, 1, "{bad:?}: {out}{err}");
        assert!(err.contains("sha256: followed by 64 lowercase hex digits"), "{err}");
    }
    // No provider named: no verdict possible.
    let (code, _, err) = inventory(&etcd, &["--require-retirable", &k1]);
    assert_eq!(code, 1);
    assert!(err.contains("--provider"), "{err}");

    // The exact key_id, in both forms, with the prefix missing its slash: objects remain.
    for form in [&k1, &hash1] {
        let (code, out, _) = inventory(
            &etcd,
            &["--prefix", "/registry", "--provider", p, "--require-retirable", form],
        );
        assert_eq!(code, 2, "{out}");
        assert!(out.contains("4 objects: NOT retirable"), "{out}");
        assert!(
            out.lines()
                .last()
                .unwrap()
                .starts_with("next: run `kms-plugin migrate`"),
            "{out}"
        );
    }
    // Unencrypted objects and other providers' objects are listed by key.
    let (_, out, _) = inventory(&etcd, &["--provider", p, "--require-retirable", &k1]);
    assert!(
        out.contains("not encrypted: 1") && out.contains("/registry/secrets/default/plain"),
        "{out}"
    );
    assert!(out.contains("/registry/configmaps/default/other"), "{out}");

    // Nothing of the provider under the prefix: exit 4, saying what was found instead.
    let (code, out, _) = inventory(
        &etcd,
        &["--prefix", "/registy/", "--provider", p, "--require-retirable", &k1],
    );
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("NO VERDICT") && out.contains("0 keys read"), "{out}");
    // A wrong provider name: a key with objects stays NOT retirable (2); one without is no
    // verdict (4), and the report names the providers it did see.
    let (code, out, _) = inventory(&etcd, &["--provider", "kms-plugn", "--require-retirable", &k1]);
    assert_eq!(code, 2, "{out}");
    let (code, out, _) = inventory(&etcd, &["--provider", "kms-plugn", "--require-retirable", &k2]);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("kms-plugin (3)") && out.contains("someone-else (1)"),
        "{out}"
    );
    let empty = Etcd::start(&dir).await;
    let (code, out, _) = inventory(&empty, &["--provider", p, "--require-retirable", &k1]);
    assert_eq!(code, 4, "{out}");
    let (code, doc) = json(&empty, &["--provider", p, "--require-retirable", &hash1]);
    assert_eq!((code, &doc["require_retirable"]["verdict"]), (4, &"no_evidence".into()));

    // A key_id no object names: retirable, and said to be never seen.
    let (code, out, _) = inventory(&etcd, &["--provider", p, "--require-retirable", &k2]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("never seen"), "{out}");
    // With --config: the current key is never retirable, even with no object under it, and a
    // decrypt-only key is said to be still configured.
    let new_only = new_only.to_str().unwrap();
    let (code, out, _) = inventory(
        &etcd,
        &["--config", new_only, "--provider", p, "--require-retirable", &k2],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("the CURRENT key of this configuration"), "{out}");
    let (code, out, _) = inventory(
        &etcd,
        &[
            "--config",
            rotated.to_str().unwrap(),
            "--provider",
            p,
            "--require-retirable",
            &k1,
        ],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("still named by this configuration"), "{out}");
    let (_, out, _) = inventory(
        &etcd,
        &["--config", new_only, "--provider", p, "--require-retirable", &k1],
    );
    assert!(out.contains("not named by this configuration"), "{out}");
}

/// `inventory` with `env`: (exit code, stdout, stderr).
fn inventory_env(etcd: &Etcd, extra: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("inventory")
        .args(etcd.args())
        .args(extra)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Seals three seeds with a plugin on `config`, stores them as Secrets under `/<name>/`, and
/// checks that `--verify --config` opens them all, the keys resolved as `serve` resolves them.
async fn verify_opens_all(etcd: &Etcd, name: &str, config: &std::path::Path, env: &[(&str, String)]) -> Vec<String> {
    let plugin = Plugin::start_env(config, env).await;
    let mut c = plugin.client().await;
    let mut keys = Vec::new();
    for i in 0..3 {
        let seed = encrypt(&mut c, &rand_bytes(32)).await;
        let key = format!("/{name}/secrets/default/s-{i}");
        etcd.put(key.as_bytes(), &kms_v2_value("kms-plugin", &seed)).await;
        keys.push(key);
    }
    plugin.stop().await;
    let args = [
        "--prefix",
        &format!("/{name}/"),
        "--verify",
        "--config",
        config.to_str().unwrap(),
    ];
    let (code, out, err) = inventory_env(etcd, &args, env);
    assert_eq!(code, 0, "{name}: {out}{err}");
    assert!(
        out.contains("all 3 objects open with this configuration"),
        "{name}: {out}"
    );
    args.iter().map(|s| s.to_string()).collect()
}

/// With the backend's server gone, `--verify` is an error (exit 1), never a verdict on the data.
fn verify_refuses_without_backend(etcd: &Etcd, name: &str, args: &[String], env: &[(&str, String)]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = inventory_env(etcd, &args, env);
    assert_eq!(code, 1, "{name}: {out}{err}");
    assert!(err.contains("the backend cannot answer now"), "{name}: {err}");
    assert!(!out.contains("do NOT open"), "{name}: {out}");
}

#[tokio::test]
async fn verify_resolves_every_backends_keys_and_a_stopped_server_is_an_error() {
    use crate::common::kmip::Kmip;
    use crate::common::moto::Moto;
    use crate::common::openbao::Bao;
    use crate::common::softhsm::SoftHsm;
    let dir = Dir::new();
    let etcd = Etcd::start(&dir).await;

    // KMIP learns its key_ids only from the server.
    let mut kmip = Kmip::start(&dir);
    kmip.create_key("kms-root");
    let args = verify_opens_all(&etcd, "kmip", &kmip.config(&dir, "kms-root", "", ""), &[]).await;
    kmip.stop();
    verify_refuses_without_backend(&etcd, "kmip", &args, &[]);

    // AWS: the alias resolved to the key's ARN; then the server stops answering, and then
    // there are no credentials at all.
    let moto = Moto::start().await;
    let key = moto.create_key().await;
    moto.alias("alias/kms-plugin", &key).await;
    let config = moto.config(&dir, "alias/kms-plugin", &[], "");
    let args = verify_opens_all(&etcd, "aws", &config, &Moto::env()).await;
    let no_credentials = [("AWS_EC2_METADATA_DISABLED", "true".to_string())];
    verify_refuses_without_backend(&etcd, "aws without credentials", &args, &no_credentials);
    moto.pause(true);
    verify_refuses_without_backend(&etcd, "aws", &args, &Moto::env());
    moto.pause(false);

    // Vault / OpenBao Transit.
    let mut bao = Bao::dev(&dir);
    bao.cli(&["write", "-f", "transit/keys/k"]);
    bao.plugin_policy("kms", "k");
    let auth = bao.token_auth(&dir, &bao.token("kms", "1h"));
    let args = verify_opens_all(&etcd, "vault", &bao.config(&dir, "k", &[], &auth, "", ""), &[]).await;
    bao.stop();
    verify_refuses_without_backend(&etcd, "vault", &args, &[]);

    // PKCS#11 (SoftHSM2): a library, nothing to stop.
    let hsm = SoftHsm::new(&dir);
    hsm.keygen("root-0");
    let config = hsm.config(&dir, "root-0", &[], &hsm.pin_file, "");
    verify_opens_all(&etcd, "pkcs11", &config, &hsm.env()).await;
}

/// Peak RSS (KiB) of `inventory --json --page-size 200` over `etcd`, which must hold `n` keys.
fn inventory_peak_rss(etcd: &Etcd, n: usize) -> u64 {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "maxrss_kib=%M", BIN, "inventory", "--json", "--page-size", "200"])
        .args(etcd.args())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["keys_scanned"], n as u64);
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("maxrss_kib="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {stderr}"))
}

/// README: memory does not grow with the size of etcd. Ten times the data (2,000 vs 20,000
/// objects of ~1 KiB, 2 vs 20 MiB of values) must not cost the scan more than a few MiB.
#[tokio::test]
async fn inventory_memory_does_not_grow_with_etcd() {
    let dir = Dir::new();
    let etcd = Etcd::start(&dir).await;
    let value = |i: usize| {
        let mut v = b"k8s:enc:kms:v2:kms-plugin:".to_vec();
        let object = EncryptedObject {
            encrypted_data: vec![0x5a; 1024],
            key_id: format!("local:{:032x}", i % 3),
            encrypted_dek_source: vec![1; 61],
            annotations: Default::default(),
            encrypted_dek_source_type: 1,
        };
        v.extend(object.encode_to_vec());
        v
    };
    let put = |from: usize, to: usize| {
        (from..to).map(move |i| (format!("/registry/secrets/ns/s-{i:06}").into_bytes(), value(i)))
    };
    etcd.put_many(put(0, 2_000), 64).await;
    let small = inventory_peak_rss(&etcd, 2_000);
    etcd.put_many(put(2_000, 20_000), 64).await;
    let large = inventory_peak_rss(&etcd, 20_000);
    println!("inventory peak RSS: {small} KiB over 2,000 objects, {large} KiB over 20,000");
    assert!(
        large < small + 6 * 1024,
        "{small} KiB → {large} KiB: memory grows with etcd"
    );
    assert!(large < 48 * 1024, "{large} KiB");
}

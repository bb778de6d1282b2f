//! Key material the plugin has let go of is gone from its memory, not only from its cache.
//!
//! The test reads the running plugin's memory through /proc/PID/mem (the test runs as root, or
//! as the plugin's parent) and looks for the raw bytes of local KEKs. It learns those bytes the
//! way only a root-key holder can: by unwrapping each KEK's annotation with the local root key.

use std::time::{Duration, Instant};

use crate::common::*;
use kms_plugin::backend::Backend;
use kms_plugin::backend::local::LocalBackend;
use kms_plugin::contract::KEK_ANNOTATION;
use kms_plugin::proto::v2::{EncryptRequest, EncryptResponse};

/// Every readable, writable mapping of `pid` (heap, thread stacks, anonymous memory), in full.
fn writable_memory(pid: u32) -> Vec<(String, Vec<u8>)> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("read the plugin's memory (run as root)");
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        let name = fields.nth(3).unwrap_or("[anon]").to_string();
        if !perms.starts_with("rw") || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut buf = vec![0u8; (end - start) as usize];
        mem.seek(SeekFrom::Start(start)).unwrap();
        // A mapping can shrink between reading maps and reading it; keep what could be read.
        let n = mem.read(&mut buf).unwrap_or(0);
        buf.truncate(n);
        out.push((name, buf));
    }
    out
}

/// Where `needle` occurs: the names of the mappings holding it.
fn copies(memory: &[(String, Vec<u8>)], needle: &[u8]) -> Vec<String> {
    memory
        .iter()
        .flat_map(|(name, bytes)| {
            bytes
                .windows(needle.len())
                .filter(|w| *w == needle)
                .map(move |_| name.clone())
        })
        .collect()
}

/// Encrypts until the plugin's current KEK differs from every one in `seen` (max_uses = 1 makes
/// each Encrypt ask for a rotation; until it lands, Encrypt may be refused or use the old KEK).
async fn encrypt_under_new_kek(c: &mut kms_plugin::client::Client, seen: &[Vec<u8>]) -> EncryptResponse {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let request = EncryptRequest {
            plaintext: rand_bytes(32).into(),
            uid: rand_hex(8),
        };
        if let Ok(e) = c.encrypt(request).await {
            let e = e.into_inner();
            if !seen.contains(&e.annotations[KEK_ANNOTATION].to_vec()) {
                return e;
            }
        }
        assert!(Instant::now() < deadline, "the local KEK never rotated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn evicted_keks_leave_no_copy_in_memory() {
    let dir = Dir::new();
    let config = dir.config(
        &dir.socket(),
        "root.key",
        &[],
        "[kek]\nmax_uses = 1\ncache_capacity = 1",
    );
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;

    // Eight KEKs made, wrapped and retired by the rotation path (generate, wrap, verify-unwrap).
    let mut sealed = Vec::new();
    let mut wrapped: Vec<Vec<u8>> = Vec::new();
    for _ in 0..8 {
        let e = encrypt_under_new_kek(&mut c, &wrapped).await;
        wrapped.push(e.annotations[KEK_ANNOTATION].to_vec());
        sealed.push(e);
    }
    // Let the rotation the last Encrypt asked for land, so nothing moves while we look.
    // The first KEK and seven rotations made the eight; the eighth Encrypt asked for one more.
    eventually("the last rotation", || async {
        plugin.metric("kms_plugin_kek_rotations_total").await >= 9.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Cold Decrypts, all at once on connections of their own so that several tasks and both
    // worker threads unwrap: each unwrap goes through the backend and, with room for one KEK in
    // the cache, evicts another. Then one more makes the last KEK the cached one.
    let mut calls = tokio::task::JoinSet::new();
    for e in sealed.clone() {
        let mut c = plugin.client().await;
        calls.spawn(async move { decrypt(&mut c, &e).await.unwrap() });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    decrypt(&mut c, sealed.last().unwrap()).await.unwrap();

    let root = LocalBackend::open(&dir.key("root.key"), &[]).unwrap();
    let mut keks = Vec::new();
    for e in &sealed {
        let kek = root.unwrap(&e.key_id, &e.annotations[KEK_ANNOTATION]).await.unwrap();
        keks.push(kek.expose().to_vec());
    }
    let pid = plugin.child.id();
    let memory = writable_memory(pid);
    // The cached KEK is in memory exactly once (its cache entry): so the scan sees key material,
    // and no call that used it left a copy behind (a moved-from value, an AES key schedule).
    let (cached, evicted) = keks.split_last().unwrap();
    let at = copies(&memory, cached);
    assert_eq!(at.len(), 1, "the cached KEK should be in memory once, found in: {at:?}");
    let left: Vec<_> = evicted
        .iter()
        .enumerate()
        .map(|(i, kek)| (i, copies(&memory, kek)))
        .filter(|(_, at)| !at.is_empty())
        .collect();
    assert!(
        left.is_empty(),
        "evicted KEKs still in memory (KEK index, mappings): {left:?}"
    );
    plugin.stop().await;
}

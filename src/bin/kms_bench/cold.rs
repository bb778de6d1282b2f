//! cold-start and startup: scenarios that start this plugin's binary themselves.
//!
//! cold-start models an apiserver restart after a long life: every distinct stored seed costs one
//! Decrypt, the seeds were sealed under several local KEKs (here: one short-lived plugin process
//! per KEK, all sharing one root key), and the plugin that must open them has just started, with
//! nothing cached and a remote KMS 20 ms away. A good plugin pays one backend unwrap per KEK.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kms_plugin::client::Client;
use kms_plugin::proto::v2::{DecryptRequest, EncryptRequest};

use crate::Args;
use crate::grpc::{code_name, connect_all, random_bytes};
use crate::load::Measured;
use crate::plugin::{Proc, Root, TempDir, keygen, write_config};
use crate::report::{Extra, Report};

const READY_LIMIT: Duration = Duration::from_secs(20);

struct Sealed {
    plaintext: Vec<u8>,
    request: DecryptRequest,
}

/// Encrypts `plaintexts` on `clients` at `concurrency`; results in input order.
async fn encrypt_all(clients: &[Client], plaintexts: Vec<Vec<u8>>, concurrency: usize) -> Result<Vec<Sealed>, String> {
    let plaintexts = Arc::new(plaintexts);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency.min(plaintexts.len()).max(1) {
        let (mut client, plaintexts, next) = (
            clients[w % clients.len()].clone(),
            Arc::clone(&plaintexts),
            Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Relaxed);
                let Some(p) = plaintexts.get(i) else { break };
                let r = client
                    .encrypt(EncryptRequest {
                        plaintext: p.clone().into(),
                        uid: format!("seal-{i}"),
                    })
                    .await
                    .map_err(|s| format!("sealing seeds: Encrypt failed with {}: {}", code_name(&s), s.message()))?
                    .into_inner();
                let request = DecryptRequest {
                    ciphertext: r.ciphertext,
                    uid: String::new(),
                    key_id: r.key_id,
                    annotations: r.annotations,
                };
                out.push((i, request));
            }
            Ok::<_, String>(out)
        }));
    }
    let mut requests: Vec<Option<DecryptRequest>> = (0..plaintexts.len()).map(|_| None).collect();
    for t in tasks {
        for (i, r) in t.await.map_err(|e| e.to_string())?? {
            requests[i] = Some(r);
        }
    }
    let plaintexts = Arc::try_unwrap(plaintexts).map_err(|_| "plaintexts still shared")?;
    Ok(plaintexts
        .into_iter()
        .zip(requests)
        .map(|(plaintext, r)| Sealed {
            plaintext,
            request: r.expect("every index encrypted"),
        })
        .collect())
}

/// A deterministic shuffle (splitmix64 Fisher–Yates): the apiserver reads in key order, which
/// has nothing to do with which KEK sealed a value.
fn shuffle<T>(items: &mut [T], mut state: u64) {
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// The identity of the KEK a ciphertext was sealed under, as far as the wire shows: its
/// key_id and annotations (sorted).
fn kek_identity(r: &DecryptRequest) -> Vec<u8> {
    let mut keys: Vec<&String> = r.annotations.keys().collect();
    keys.sort();
    let mut id = r.key_id.as_bytes().to_vec();
    for k in keys {
        id.extend_from_slice(k.as_bytes());
        id.push(0);
        id.extend_from_slice(&r.annotations[k]);
        id.push(0);
    }
    id
}

pub async fn run(args: &Args) -> Result<Report, String> {
    let n = args.seeds;
    let k = args.keks;
    if n == 0 || k == 0 || k > n {
        return Err("cold-start needs 1 <= --keks <= --seeds".into());
    }
    if args.plaintext_bytes == 0 {
        return Err("--plaintext-bytes must be at least 1".into());
    }
    let dir = TempDir::new("cold")?;
    let root = root(args, &dir)?;

    // 1. Seal: K short-lived plugins, one local KEK each, sharing the root key.
    let mut sealed = Vec::with_capacity(n);
    for i in 0..k {
        let share = n / k + usize::from(i < n % k);
        let socket = dir.path().join(format!("seal-{i}.sock"));
        let config = write_config(dir.path(), &format!("seal-{i}.toml"), &socket, &root, "")?;
        let mut proc = Proc::spawn(&args.plugin, &config, &socket)?;
        proc.wait_ready(Instant::now(), READY_LIMIT).await?;
        let clients = connect_all(&socket.display().to_string(), 1, args.timeout).await?;
        let plaintexts = (0..share).map(|_| random_bytes(args.plaintext_bytes)).collect();
        sealed.extend(encrypt_all(&clients, plaintexts, args.concurrency).await?);
        drop(clients);
        proc.stop().await?;
    }
    let distinct_keks = sealed
        .iter()
        .map(|s| kek_identity(&s.request))
        .collect::<HashSet<_>>()
        .len();
    shuffle(&mut sealed, 0x6b6d_732d_6265_6e63);

    // 2. A fresh plugin with a slow backend; nothing cached.
    let socket = dir.path().join("fresh.sock");
    let bench = match args.latency.is_zero() {
        true => String::new(),
        false => format!("[bench]\nbackend_latency = \"{}ms\"\n", args.latency.as_millis()),
    };
    let config = write_config(dir.path(), "fresh.toml", &socket, &root, &bench)?;
    let spawned = Instant::now();
    let mut proc = Proc::spawn(&args.plugin, &config, &socket)?;
    let ready = proc.wait_ready(spawned, READY_LIMIT).await?;
    let clients = connect_all(&socket.display().to_string(), args.connections, args.timeout).await?;

    // 3. The burst: every seed once, `concurrency` in flight, each plaintext verified.
    let sealed = Arc::new(sealed);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let (mut client, sealed, next) = (
            clients[w % clients.len()].clone(),
            Arc::clone(&sealed),
            Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
            let mut measured = Measured::new();
            let mut last = Instant::now();
            loop {
                let i = next.fetch_add(1, Relaxed);
                let Some(s) = sealed.get(i) else { break };
                let mut request = s.request.clone();
                request.uid = format!("cold-{i}");
                let t0 = Instant::now();
                let result = match client.decrypt(request).await {
                    Ok(r) if r.get_ref().plaintext[..] == s.plaintext[..] => Ok(()),
                    Ok(_) => Err("Mismatch".to_string()),
                    Err(status) => Err(code_name(&status)),
                };
                last = Instant::now();
                measured.record(last - t0, result);
            }
            (measured, last)
        }));
    }
    let mut measured = Measured::new();
    let mut finished = started;
    for t in tasks {
        let (m, last) = t.await.map_err(|e| e.to_string())?;
        measured.merge(m);
        finished = finished.max(last);
    }
    measured.elapsed = finished - started;
    let since_spawn = finished - spawned;
    drop(clients);
    let peak_rss = proc_status_kib(proc.pid(), "VmHWM:");
    let log = proc.stop().await?;

    Ok(Report::new("cold-start", args.concurrency, args.connections, measured)
        .extra("seeds", Extra::Int(n as u64))
        .extra("keks", Extra::Int(k as u64))
        .extra("distinct_keks_seen", Extra::Int(distinct_keks as u64))
        .extra("backend_latency_ms", Extra::Float(args.latency.as_secs_f64() * 1e3))
        .extra("unwraps", Extra::Int(log.unwraps))
        .extra("wraps", Extra::Int(log.wraps))
        .extra("ready_ms", Extra::Float(ready.as_secs_f64() * 1e3))
        .extra("since_spawn_s", Extra::Float(since_spawn.as_secs_f64()))
        .extra("peak_rss_kib", Extra::Int(peak_rss.unwrap_or(0)))
        .extra("threads", Extra::Int(args.threads as u64)))
}

/// The root key: `--backend FILE`'s `[backend]` table, else a new local key file.
fn root(args: &Args, dir: &TempDir) -> Result<Root, String> {
    match &args.backend {
        Some(file) => std::fs::read_to_string(file)
            .map(Root::Backend)
            .map_err(|e| format!("--backend {}: {e}", file.display())),
        None => {
            let key = dir.path().join("root.key");
            keygen(&args.plugin, &key)?;
            Ok(Root::Local(key))
        }
    }
}

/// startup: spawn the plugin `--repeat` times on a fresh config and time the first healthy
/// Status. The histogram holds one sample per start.
pub async fn startup(args: &Args) -> Result<Report, String> {
    let dir = TempDir::new("startup")?;
    let root = root(args, &dir)?;
    let mut measured = Measured::new();
    let mut rss_kib = Vec::new();
    let started = Instant::now();
    for i in 0..args.repeat.max(1) {
        let socket = dir.path().join(format!("s{i}.sock"));
        let config = write_config(dir.path(), &format!("s{i}.toml"), &socket, &root, "")?;
        let spawned = Instant::now();
        let mut proc = Proc::spawn(&args.plugin, &config, &socket)?;
        let ready = proc.wait_ready(spawned, READY_LIMIT).await?;
        measured.record(ready, Ok(()));
        if let Some(kib) = proc_status_kib(proc.pid(), "VmRSS:") {
            rss_kib.push(kib);
        }
        proc.stop().await?;
    }
    measured.elapsed = started.elapsed();
    let mut report = Report::new("startup", 1, 1, measured).without_throughput();
    if let Some(max) = rss_kib.iter().max() {
        report = report.extra("rss_after_ready_kib", Extra::Int(*max));
    }
    Ok(report)
}

/// A kB field of /proc/PID/status (`VmRSS:` now, `VmHWM:` peak).
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

//! What a local peer, a typo or a bad file can do to the running binary: nothing that takes it
//! down, starves it, or hides its errors.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::common::*;
use kms_plugin::contract::KEK_ANNOTATION;
use kms_plugin::proto::v2::{DecryptRequest, StatusRequest};

fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        // A free port unless the test names one: never the shared default 9464.
        .env("KMS_PLUGIN_METRICS__ADDRESS", "127.0.0.1:0")
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    outcome(&out)
}

/// Lets this test process hold thousands of sockets.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).unwrap();
}

/// Status, Encrypt and Decrypt on a fresh connection, each within the apiserver's 3 s. A
/// connection reset is retried once on a new connection, as grpc-go does: a flood from the
/// apiserver's own uid may evict an idle connection of that uid (different uids never can).
async fn legitimate_calls_work(plugin: &Plugin) {
    for attempt in 0..2 {
        match legitimate_calls(plugin).await {
            Ok(()) => return,
            Err(e) if attempt == 0 && matches!(e.code(), Code::Unknown | Code::Unavailable) => continue,
            Err(e) => panic!("a legitimate call failed: {e:?}"),
        }
    }
}

async fn legitimate_calls(plugin: &Plugin) -> Result<(), tonic::Status> {
    let deadline = Duration::from_secs(3);
    let mut c = tokio::time::timeout(deadline, plugin.client())
        .await
        .expect("connect in time");
    let st = tokio::time::timeout(deadline, c.status(StatusRequest {}))
        .await
        .expect("Status in time")?
        .into_inner();
    assert_eq!(st.healthz, "ok");
    let seed = rand_bytes(32);
    let request = kms_plugin::proto::v2::EncryptRequest {
        plaintext: seed.clone().into(),
        uid: "legit".into(),
    };
    let e = tokio::time::timeout(deadline, c.encrypt(request))
        .await
        .expect("Encrypt in time")?
        .into_inner();
    let back = tokio::time::timeout(deadline, decrypt(&mut c, &e))
        .await
        .expect("Decrypt in time")?;
    assert_eq!(back, seed);
    Ok(())
}

#[tokio::test]
async fn slow_clients_cannot_starve_the_health_port() {
    use std::sync::atomic::AtomicUsize;
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let address = plugin.http_address().await;
    // 128 connections that send half a request, or nothing, and stall; each is replaced as soon
    // as the plugin closes it, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for i in 0..128 {
        let (address, stop, closed) = (address.clone(), stop.clone(), closed.clone());
        let head = b"GET /livez HTTP/1.1\r\nHost: x\r\n";
        let half = &head[..if i % 2 == 0 { head.len() } else { 0 }];
        attackers.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                if let Ok(mut s) = tokio::net::TcpStream::connect(&address).await {
                    let _ = s.write_all(half).await;
                    let mut buf = [0u8; 64];
                    // The plugin closed a connection it had taken (no reply to half a request).
                    if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                        closed.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The kubelet's probe: 40 tries, each with its default 1 s timeout.
    let mut failures = 0;
    for _ in 0..40 {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(&address).await?;
            s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        match tokio::time::timeout(Duration::from_secs(1), probe).await {
            Ok(Ok(out)) if out.starts_with("HTTP/1.1 200") => {}
            _ => failures += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Relaxed);
    for a in attackers {
        a.abort();
    }
    assert_eq!(failures, 0, "liveness probes failed under slow clients");
    // The attackers really held the port: the plugin had to close hundreds of their connections.
    let evicted = plugin
        .metric("kms_plugin_http_connections_closed_total{reason=\"evicted\"}")
        .await;
    let closed = closed.load(Relaxed);
    eprintln!("slow clients: {closed} connections closed by the plugin, {evicted} evicted");
    assert!(
        closed > 2 * 128 && evicted > 128.0,
        "{closed} closed, {evicted} evicted"
    );
    plugin.stop().await;
}

#[tokio::test]
async fn stalled_streams_and_idle_connections_cannot_exhaust_memory() {
    raise_fd_limit();
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    // The process limit a systemd unit without LimitNOFILE would give it.
    let limit = Some(1024);
    rustix::process::prlimit(
        rustix::process::Pid::from_raw(plugin.child.id() as i32),
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: limit,
            maximum: limit,
        },
    )
    .unwrap();
    legitimate_calls_work(&plugin).await;

    // 2,700 calls that each send all but the last 8 bytes of the largest message the plugin
    // reads, and 300 that announce a message over the limit; none of them ever finishes.
    let mut streams = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..30 {
        let send = raw::connect(&plugin.socket).await;
        for i in 0..100 {
            let body = if i < 90 {
                let mut b = raw::frame(&vec![0x0a; 4 * 1024]);
                b.truncate(b.len() - 8);
                b
            } else {
                let mut b = raw::frame(&vec![0x0a; 64 * 1024]);
                b.truncate(b.len() - 8);
                b
            };
            streams.push(raw::open_stalled(&send, "Decrypt", body).await);
        }
        conns.push(send);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    legitimate_calls_work(&plugin).await;

    // 3,000 more connections: half silent, half that stop inside the HTTP/2 preface.
    let mut idle = Vec::new();
    for round in 0..6 {
        for i in 0..500 {
            if let Ok(mut s) = tokio::net::UnixStream::connect(&plugin.socket).await {
                if (round + i) % 2 == 0 {
                    let _ = s.write_all(b"PRI * HTTP/2.0\r\n").await;
                }
                idle.push(s);
            }
        }
        legitimate_calls_work(&plugin).await;
    }
    let (rss, peak) = plugin.memory_kib();
    eprintln!("plugin RSS {rss} KiB, peak {peak} KiB");
    assert!(peak < 48 * 1024, "peak RSS {peak} KiB (now {rss} KiB)");
    let evicted = plugin
        .metric("kms_plugin_socket_connections_closed_total{reason=\"evicted\"}")
        .await;
    assert!(evicted >= 2900.0, "{evicted} connections evicted");
    assert!(plugin.metric("kms_plugin_socket_connections ").await <= 64.0);
    drop((idle, streams, conns));
    legitimate_calls_work(&plugin).await;
    plugin.stop().await;
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_handshake_timeout() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let mut silent = tokio::net::UnixStream::connect(&plugin.socket).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    // The server's own SETTINGS frame may come first; then EOF.
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        while silent.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
    })
    .await;
    assert!(closed.is_ok(), "a silent connection stayed open");
    assert!(started.elapsed() >= Duration::from_secs(4), "{:?}", started.elapsed());
    assert_eq!(
        plugin
            .metric("kms_plugin_socket_connections_closed_total{reason=\"handshake_timeout\"}")
            .await,
        1.0
    );
    plugin.stop().await;
}

/// Decrypt requests for a KEK the plugin has never seen: made by another instance.
async fn cold_requests(dir: &Dir, n: usize) -> Vec<(Vec<u8>, DecryptRequest)> {
    let socket = dir.path("maker/kms.sock").display().to_string();
    let maker = Plugin::start(&dir.config(&socket, "root.key", &[], "")).await;
    let mut c = maker.client().await;
    let mut out = Vec::new();
    for _ in 0..n {
        let seed = rand_bytes(32);
        let e = encrypt(&mut c, &seed).await;
        out.push((seed, decrypt_request(&e)));
    }
    maker.stop().await;
    out
}

#[tokio::test]
async fn garbage_decrypt_floods_neither_block_real_decrypts_nor_look_like_an_outage() {
    let dir = Dir::new();
    let cold = cold_requests(&dir, 1).await;
    let config = dir.config(&dir.socket(), "root.key", &[], "[bench]\nbackend_latency = \"250ms\"");
    let plugin = Plugin::start(&config).await;
    let template = cold[0].1.clone();
    let garbage = |i: u32| {
        let mut r = template.clone();
        let mut blob = rand_bytes(60);
        blob[..4].copy_from_slice(&i.to_be_bytes());
        r.annotations = HashMap::from([(KEK_ANNOTATION.to_string(), blob.into())]);
        r
    };
    // 300 concurrent Decrypts with distinct garbage KEKs, over ten connections.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(plugin.client().await);
    }
    let mut flood = Vec::new();
    for i in 0..300u32 {
        let (mut c, request) = (clients[i as usize % 10].clone(), garbage(i));
        flood.push(tokio::spawn(
            async move { c.decrypt(request).await.unwrap_err().code() },
        ));
    }
    plugin.wait_unwrap_in_flight().await;
    // A real cold Decrypt during the flood, with the apiserver's 3 s deadline.
    let mut c = plugin.client().await;
    let mut request = tonic::Request::new(cold[0].1.clone());
    request.set_timeout(Duration::from_secs(3));
    let plaintext = c.decrypt(request).await.expect("a real Decrypt during a garbage flood");
    assert_eq!(plaintext.into_inner().plaintext.to_vec(), cold[0].0);
    for f in flood {
        assert_eq!(f.await.unwrap(), Code::DataLoss);
    }
    assert_eq!(plugin.metric("kms_plugin_backend_healthy ").await, 1.0);
    assert_eq!(status(&mut c).await.healthz, "ok");

    // The same garbage 500 times (50 at a time) costs one backend call.
    let before = plugin.backend_calls("unwrap").await;
    let same = garbage(999_999);
    for _ in 0..10 {
        let mut batch = Vec::new();
        for _ in 0..50 {
            let (mut c, r) = (c.clone(), same.clone());
            batch.push(tokio::spawn(async move { c.decrypt(r).await.unwrap_err().code() }));
        }
        for b in batch {
            assert_eq!(b.await.unwrap(), Code::DataLoss);
        }
    }
    assert_eq!(plugin.backend_calls("unwrap").await - before, 1);
    plugin.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_precise_codes_logs_and_counts() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let send = raw::connect(&plugin.socket).await;
    let cases: [(&str, &str, Vec<u8>); 6] = [
        ("key_id not UTF-8", "Decrypt", vec![0x1a, 0x02, 0xff, 0xfe]),
        ("uid not UTF-8", "Encrypt", vec![0x12, 0x01, 0xff]),
        (
            "annotation key not UTF-8",
            "Decrypt",
            vec![0x22, 0x06, 0x0a, 0x01, 0xff, 0x12, 0x01, 0x00],
        ),
        ("wrong wire type", "Decrypt", vec![0x08, 0x01]),
        ("truncated varint", "Decrypt", vec![0x1a, 0x80]),
        ("truncated varint in Status", "Status", vec![0x08, 0x80]),
    ];
    for (what, method, msg) in &cases {
        let (code, message) = raw::call(&send, method, raw::frame(msg)).await;
        assert_eq!(code, Code::InvalidArgument as i32, "{what}: {message}");
    }
    let (code, message) = raw::call(&send, "Decrypt", raw::frame(&vec![0x0a; 5_000])).await;
    assert_eq!(code, Code::ResourceExhausted as i32, "{message}");
    assert!(message.contains("4096"), "{message}");
    // Half a message, then nothing: failed after the body deadline.
    let started = Instant::now();
    let mut half = raw::frame(&[0x0a; 100]);
    half.truncate(50);
    let (code, message) = raw::call_ending(&send, "Decrypt", half, false).await;
    assert_eq!(code, Code::DeadlineExceeded as i32, "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(plugin.wait_log("request refused before reaching a handler").await);
    let (_, m) = plugin.http_get("/metrics").await;
    for needle in [
        "kms_plugin_grpc_requests_total{method=\"Decrypt\",code=\"InvalidArgument\"} 4",
        "kms_plugin_grpc_requests_total{method=\"Encrypt\",code=\"InvalidArgument\"} 1",
        "kms_plugin_grpc_requests_total{method=\"Status\",code=\"InvalidArgument\"} 1",
        "kms_plugin_grpc_requests_total{method=\"Decrypt\",code=\"ResourceExhausted\"} 1",
        "kms_plugin_grpc_requests_total{method=\"Decrypt\",code=\"DeadlineExceeded\"} 1",
    ] {
        assert!(m.contains(needle), "missing {needle:?} in\n{m}");
    }
    // An error the handler produced is counted once, by the handler.
    let mut c = plugin.client().await;
    let mut bad = decrypt_request(&encrypt(&mut c, &rand_bytes(32)).await);
    bad.key_id = "local:unknown".into();
    assert_eq!(c.decrypt(bad).await.unwrap_err().code(), Code::NotFound);
    assert!(
        plugin
            .http_get("/metrics")
            .await
            .1
            .contains("kms_plugin_grpc_requests_total{method=\"Decrypt\",code=\"NotFound\"} 1")
    );
    plugin.stop().await;
}

#[tokio::test]
async fn status_and_readyz_fail_at_the_seal_hard_stop() {
    let dir = Dir::new();
    // One seal per KEK, and every backend call (so every rotation) takes 3 s.
    let extra = "[kek]\nmax_uses = 1\n[bench]\nbackend_latency = \"3s\"";
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], extra)).await;
    let mut c = plugin.client().await;
    encrypt(&mut c, &rand_bytes(32)).await;
    encrypt(&mut c, &rand_bytes(32)).await;
    // The hard stop (2 × max_uses) is reached while the rotation is still running.
    let err = c
        .encrypt(kms_plugin::proto::v2::EncryptRequest {
            plaintext: rand_bytes(32).into(),
            uid: "u".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("use limit"), "{err:?}");
    let err = c.status(StatusRequest {}).await.unwrap_err();
    assert!(err.message().contains("use limit"), "{err:?}");
    let (code, body) = plugin.http_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("exhausted"), "{body}");
    // Once the rotation lands, all is well again.
    eventually("Status to recover", || async {
        c.clone().status(StatusRequest {}).await.is_ok()
    })
    .await;
    assert_eq!(plugin.http_get("/readyz").await.0, 200);
    plugin.stop().await;
}

#[tokio::test]
async fn key_material_commands_disable_core_dumps() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "[bench]\nbackend_latency = \"2s\"");
    let mut child = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
}

#[tokio::test]
async fn unsafe_files_and_directories_are_refused() {
    let dir = Dir::new();
    // A socket directory others can write: they could swap the socket for their own.
    let open_dir = dir.path("open");
    std::fs::create_dir(&open_dir).unwrap();
    // A taken metrics port too: the socket directory is still what gets reported, because it
    // is checked before anything is bound.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    for mode in [0o777, 0o770, 0o1777] {
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let socket = open_dir.join("kms.sock").display().to_string();
        let config = dir.config(&socket, "root.key", &[], "");
        let (ok, text) = run(
            &["serve", "--config", config.to_str().unwrap()],
            &[("KMS_PLUGIN_METRICS__ADDRESS", &taken)],
        );
        assert!(!ok && text.contains("writable by group or others"), "{mode:o}: {text}");
        assert!(!std::path::Path::new(&socket).exists());
        let (ok, text) = run(&["check", "--config", config.to_str().unwrap()], &[]);
        assert!(!ok && text.contains("writable by group or others"), "{mode:o}: {text}");
    }

    // A FIFO as key file: refused at once, not a hang.
    let fifo = dir.path("fifo.key");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.write_config(&format!(
        "[socket]\npath = {:?}\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\n",
        dir.socket(),
        fifo.display().to_string()
    ));
    for cmd in ["check", "serve"] {
        let started = Instant::now();
        let (ok, text) = run(&[cmd, "--config", config.to_str().unwrap()], &[]);
        assert!(!ok && text.contains("not a regular file"), "{cmd}: {text}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    // An all-zero key.
    let zero = dir.path("zero.key");
    std::fs::write(&zero, [0u8; 32]).unwrap();
    std::fs::set_permissions(&zero, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.write_config(&format!(
        "[socket]\npath = {:?}\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\n",
        dir.socket(),
        zero.display().to_string()
    ));
    let (ok, text) = run(&["check", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok && text.contains("all-zero"), "{text}");

    // A key file owned by another user (root arranges it; the suite runs as root, as CI does).
    assert!(
        rustix::process::geteuid().is_root(),
        "this test chowns a key file to another uid: run the suite as root"
    );
    let key = dir.key("theirs.key");
    std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
    let config = dir.config(&dir.socket(), "theirs.key", &[], "");
    let (ok, text) = run(&["check", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok && text.contains("owned by uid 65534"), "{text}");

    // A key file in a directory others can write.
    let key = dir.key("root.key");
    let shared = open_dir.join("root.key");
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(&key, &shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let config = dir.write_config(&format!(
        "[socket]\npath = {:?}\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\n",
        dir.socket(),
        shared.display().to_string()
    ));
    let (ok, text) = run(&["check", "--config", config.to_str().unwrap()], &[]);
    assert!(
        !ok && text.contains("is writable by group or others, who could replace"),
        "{text}"
    );
    assert!(
        text.contains(&format!("fix: chmod 755 {}", open_dir.display())),
        "{text}"
    );
}

#[tokio::test]
async fn the_peer_allow_lists_admit_a_peer_on_either_list() {
    let dir = Dir::new();
    let me = rustix::process::getuid().as_raw();
    let my_gid = rustix::process::getgid().as_raw();
    // The uid list names someone else; the primary gid matches: admitted.
    let config = dir.write_config(&format!(
        "[socket]\npath = {:?}\nallowed_uids = [{}]\nallowed_gids = [{my_gid}]\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\n",
        dir.socket(),
        me + 4242,
        dir.key("root.key").display().to_string()
    ));
    let plugin = Plugin::start(&config).await;
    assert_eq!(status(&mut plugin.client().await).await.healthz, "ok");
    plugin.stop().await;
}

#[tokio::test]
async fn list_settings_work_from_the_environment() {
    let dir = Dir::new();
    let (old_a, old_b) = (dir.path("a/kms.sock"), dir.path("b/kms.sock"));
    let mut olds = Vec::new();
    for (socket, key) in [(&old_a, "a.key"), (&old_b, "b.key")] {
        let p = Plugin::start(&dir.config(&socket.display().to_string(), key, &[], "")).await;
        let seed = rand_bytes(32);
        olds.push((seed.clone(), encrypt(&mut p.client().await, &seed).await));
        p.stop().await;
    }
    // The README's example: two decrypt-only keys, comma-separated.
    let files = format!("{},{}", dir.key("a.key").display(), dir.key("b.key").display());
    let me = rustix::process::getuid().as_raw().to_string();
    let uids = format!("0,{me}");
    let config = dir.config(&dir.socket(), "root.key", &[], "");
    let plugin = Plugin::start_env(
        &config,
        &[
            ("KMS_PLUGIN_BACKEND__DECRYPT_ONLY_KEY_FILES", files.as_str()),
            ("KMS_PLUGIN_SOCKET__ALLOWED_UIDS", uids.as_str()),
        ],
    )
    .await;
    let mut c = plugin.client().await;
    for (seed, e) in &olds {
        assert_eq!(&decrypt(&mut c, e).await.unwrap(), seed);
    }
    plugin.stop().await;
}

#[test]
fn configuration_mistakes_are_named() {
    let dir = Dir::new();
    let key = dir.key("root.key").display().to_string();
    let with = |extra: &str| {
        dir.write_config(&format!(
            "{extra}\n[backend]\ntype = \"local\"\ncurrent_key_file = {key:?}\n"
        ))
    };
    let cases = [
        ("[log]\nlevel = \"warning\"", "log.level"),
        ("[log]\nformat = \"xml\"", "text, json"),
        ("[socket]\nmode = 600", "0o600"),
        ("[status]\nversion = \"v3\"", "v2, v2beta1"),
        (
            &format!("[socket]\npath = {:?}\ngroup = \"no-such-group-here\"", dir.socket()),
            "no-such-group-here",
        ),
    ];
    for (extra, needle) in cases {
        let (ok, text) = run(&["check", "--config", with(extra).to_str().unwrap()], &[]);
        assert!(!ok && text.contains(needle), "{extra}: {text}");
        assert!(!text.contains("variant"), "{extra}: {text}");
    }
    for (path, needle) in [("/dev/null", "not a regular file"), ("/tmp", "is a directory")] {
        let (ok, text) = run(&["check", "--config", path], &[]);
        assert!(!ok && text.contains(needle), "{path}: {text}");
    }
    let (ok, text) = run(&["check"], &[]);
    assert!(!ok && text.contains("--config"), "{text}");
    let (ok, text) = run(&["serve"], &[]);
    assert!(!ok && text.contains("--config"), "{text}");
    // An invalid level is refused from the environment too.
    let (ok, text) = run(
        &["check", "--config", with("").to_str().unwrap()],
        &[("KMS_PLUGIN_LOG__LEVEL", "loud")],
    );
    assert!(!ok && text.contains("log.level"), "{text}");
}

#[test]
fn every_option_has_help() {
    for cmd in ["serve", "keygen", "check", "status"] {
        let (ok, text) = run(&[cmd, "--help"], &[]);
        assert!(ok, "{text}");
        for line in text.lines().filter(|l| l.trim_start().starts_with("--")) {
            let described = line.trim_start().split("  ").filter(|s| !s.trim().is_empty()).count() > 1;
            assert!(described, "{cmd}: option without a description: {line:?}");
        }
    }
}

#[tokio::test]
async fn dev_mode_takes_overrides_and_a_free_port() {
    let dir = Dir::new();
    let dev = dir.path("dev");
    // Something else holds the port dev mode is told to use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let socket = dev.join("kms.sock").display().to_string();
    let plugin = Plugin::spawn_env(
        &["serve", "--dev", dev.to_str().unwrap()],
        &socket,
        &[
            ("KMS_PLUGIN_METRICS__ADDRESS", address.as_str()),
            ("KMS_PLUGIN_KEK__MAX_USES", "7"),
        ],
    );
    plugin.wait_ready().await;
    assert!(plugin.wait_log("metrics.address is in use").await, "{}", plugin.logs());
    assert!(plugin.wait_log("kms-plugin status --socket").await, "{}", plugin.logs());
    assert_ne!(plugin.http_address().await, address);
    assert_eq!(plugin.http_get("/livez").await.0, 200);
    let mode = std::fs::metadata(&dev).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o750);
    // The environment reached dev mode: seven seals, then the KEK is due for rotation.
    let mut c = plugin.client().await;
    for _ in 0..8 {
        encrypt(&mut c, &rand_bytes(32)).await;
    }
    assert!(plugin.wait_log("reason=\"uses\"").await, "{}", plugin.logs());
    // Nothing to reload in dev mode: a SIGHUP is logged, not fatal.
    plugin.signal("HUP");
    assert!(plugin.wait_log("SIGHUP ignored").await, "{}", plugin.logs());
    assert_eq!(status(&mut c).await.healthz, "ok");
    plugin.stop().await;
}

#[tokio::test]
async fn a_flood_from_another_uid_never_displaces_our_connections() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs a peer under another uid (setpriv): run the suite as root, as CI does"
    );
    let dir = Dir::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(dir.path("run")).unwrap();
    std::fs::set_permissions(dir.path("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.write_config(&format!(
        "[socket]\npath = {:?}\nmode = \"0666\"\nmax_connections = 16\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\n",
        dir.socket(),
        dir.key("root.key").display().to_string()
    ));
    let plugin = Plugin::start(&config).await;
    // uid 65534 opens connections as fast as it can, keeping the last 100.
    let flood = "import socket,sys,time\nc=[]\nend=time.time()+float(sys.argv[2])\nwhile time.time()<end:\n  try:\n    s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);c.append(s)\n    if len(c)>100: c.pop(0).close()\n  except Exception: time.sleep(0.001)\n";
    let mut attacker = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            flood,
        ])
        .arg(&plugin.socket)
        .arg("6")
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // No retry here: another uid's flood must never cost us a connection. And the closed
    // connections must not pile up: descriptors stay bounded by the table (16 live, as many
    // closed and not yet reaped, two descriptors each), far from the process limit.
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", plugin.child.id()))
            .unwrap()
            .count()
    };
    let mut most = 0;
    for _ in 0..20 {
        legitimate_calls(&plugin).await.unwrap();
        most = most.max(fds());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(most <= 128, "the plugin held {most} descriptors during the flood");
    let _ = attacker.kill();
    let _ = attacker.wait();
    assert!(
        plugin
            .metric("kms_plugin_socket_connections_closed_total{reason=\"evicted\"}")
            .await
            > 100.0,
        "the flood did not fill the table"
    );
    plugin.stop().await;
}

#[tokio::test]
async fn a_healthy_plugin_is_quiet_at_info() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "[probe]\ninterval = \"100ms\"");
    let plugin = Plugin::spawn_env(
        &["serve", "--config", config.to_str().unwrap()],
        &dir.socket(),
        &[("RUST_LOG", "info")],
    );
    plugin.wait_ready().await;
    // Fifteen probes later: nothing about them at info (they used to log two lines each).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let probes = plugin.metric("kms_plugin_backend_calls_total{op=\"probe\"").await;
    assert!(probes >= 10.0, "{probes} probes");
    let logs = plugin.logs();
    assert!(
        !logs.contains("op=\"probe\"") && !logs.contains("op=\"verify\""),
        "{logs}"
    );
    assert!(logs.contains("serving KMS v2"), "{logs}");
    plugin.stop().await;
}

/// A peer of another uid (65534) holding every call it can on unwraps that take 1 s: 63
/// connections × 30 streams, all of a round's calls waiting on one tampered KEK. Our own
/// connection's Status and cached Decrypts must all succeed meanwhile, and so must a new
/// connection of ours. Without per-uid shares the flood held all 1,536 open-call slots.
#[tokio::test]
async fn another_uids_flood_of_waiting_decrypts_never_holds_our_calls() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs a peer under another uid (setpriv): run the suite as root, as CI does"
    );
    let dir = Dir::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(dir.path("run")).unwrap();
    std::fs::set_permissions(dir.path("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.write_config(&format!(
        "[socket]\npath = {:?}\nmode = \"0666\"\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\n[bench]\nbackend_latency = \"1s\"\n",
        dir.socket(),
        dir.key("root.key").display().to_string()
    ));
    let plugin = Plugin::start(&config).await;
    let mut ours = plugin.client().await;
    let mut cached = Vec::new();
    for _ in 0..4 {
        let seed = rand_bytes(32);
        let e = encrypt(&mut ours, &seed).await;
        assert_eq!(decrypt(&mut ours, &e).await.unwrap(), seed);
        cached.push((seed, e));
    }
    let attacker = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_kms-bench"))
        .args([
            "tampered",
            "--socket",
            &plugin.socket,
            "--connections",
            "63",
            "--concurrency",
            "1890",
        ])
        .args(["--duration", "8s", "--warmup", "0s", "--timeout", "20s", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The flood is on once hundreds of its calls have waited on unwraps.
    eventually("the flood to take hold", || async {
        plugin.metric("kms_plugin_kek_cache_coalesced_total").await >= 500.0
    })
    .await;
    let (mut ok, mut failed) = (0, Vec::new());
    let until = Instant::now() + Duration::from_secs(4);
    let mut i = 0;
    while Instant::now() < until {
        let (seed, e) = &cached[i % cached.len()];
        i += 1;
        let mut status = tonic::Request::new(StatusRequest {});
        status.set_timeout(Duration::from_secs(3));
        match ours.status(status).await {
            Ok(s) if s.get_ref().healthz == "ok" => ok += 1,
            other => failed.push(format!("Status: {other:?}")),
        }
        match tokio::time::timeout(Duration::from_secs(3), decrypt(&mut ours, e)).await {
            Ok(Ok(back)) if &back == seed => ok += 1,
            other => failed.push(format!("cached Decrypt: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new connection of ours gets in (it displaces one of the flood's) and is served.
    let fresh = legitimate_calls(&plugin).await;
    let output = attacker.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    fresh.expect("a new connection of ours during the flood");
    // The flood was real: it had calls refused for its share, and calls waiting.
    assert!(
        report.contains("ResourceExhausted"),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    plugin.stop().await;
}

/// A silent connection to `address`, replaced whenever the plugin closes it, until `stop`; returns
/// how many the plugin closed (only a connection it accepted can be).
async fn hold_silent(address: String, stop: Arc<AtomicBool>) -> usize {
    let mut closed = 0;
    while !stop.load(Relaxed) {
        let Ok(mut s) = tokio::net::TcpStream::connect(&address).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while !stop.load(Relaxed) {
            // The plugin answers nothing unasked: a read ends only when it closes the connection.
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut [0u8; 1])).await {
                Err(_) => continue,
                Ok(Ok(0) | Err(_)) => closed += 1,
                Ok(Ok(_)) => {}
            }
            break;
        }
    }
    closed
}

/// Connects to `address` and hangs up at once (a reset: no TIME_WAIT left behind), as fast as it
/// can until `stop`; returns how many connections it made.
fn churn(address: &str, stop: &AtomicBool) -> usize {
    let mut made = 0;
    while !stop.load(Relaxed) {
        if let Ok(s) = std::net::TcpStream::connect(address) {
            let _ = rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO));
            made += 1;
        }
    }
    made
}

/// A kubelet's readiness probe on a busy node: connect, wait `delay`, `GET /readyz`; Ok for a
/// 200 (with a generous timeout: a loaded test machine must not make it flaky).
fn slow_probe(address: &str, delay: Duration) -> Result<Duration, String> {
    use std::io::{Read, Write};
    let started = Instant::now();
    let address = address.parse().unwrap();
    let mut s =
        std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::thread::sleep(delay);
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    match out.starts_with("HTTP/1.1 200") {
        true => Ok(started.elapsed()),
        false => Err(format!("answer: {out:?}")),
    }
}

#[tokio::test]
async fn health_probes_survive_a_connection_churn_and_held_silent_sockets() {
    const MAX_CONNECTIONS: usize = 64;
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let address = plugin.http_address().await;
    eventually("ready", || async { plugin.http_get("/readyz").await.0 == 200 }).await;
    // Half again as many silent connections as the plugin keeps, and a connect-and-drop churn.
    let stop = Arc::new(AtomicBool::new(false));
    let holders: Vec<_> = (0..MAX_CONNECTIONS * 3 / 2)
        .map(|_| tokio::spawn(hold_silent(address.clone(), stop.clone())))
        .collect();
    let churned = {
        let (address, stop) = (address.clone(), stop.clone());
        tokio::task::spawn_blocking(move || churn(&address, &stop))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 40 probes, each sending its request 5-20 ms after connecting.
    let probes = {
        let address = address.clone();
        tokio::task::spawn_blocking(move || {
            let (mut failures, mut slowest) = (Vec::new(), Duration::ZERO);
            for i in 0..40u64 {
                let delay = Duration::from_millis(5 + i * 7 % 16);
                match slow_probe(&address, delay) {
                    Ok(took) => slowest = slowest.max(took),
                    Err(e) => failures.push(format!("probe {i} (request after {delay:?}): {e}")),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (failures, slowest)
        })
    };
    let (failures, slowest) = probes.await.unwrap();
    stop.store(true, Relaxed);
    let churned = churned.await.unwrap();
    let mut closed = 0;
    for h in holders {
        closed += h.await.unwrap();
    }
    let evicted = plugin
        .metric("kms_plugin_http_connections_closed_total{reason=\"evicted\"}")
        .await;
    eprintln!("slowest probe {slowest:?}; {churned} churned, {closed} held connections closed, {evicted} evicted");
    assert!(
        failures.is_empty(),
        "{} of 40 probes failed: {failures:#?}",
        failures.len()
    );
    // The attack landed: the plugin accepted, then closed, many held connections, and it closed
    // them to make room (only a full table evicts).
    assert!(
        closed > MAX_CONNECTIONS && evicted > MAX_CONNECTIONS as f64,
        "{closed} held connections closed, {evicted} evicted"
    );
    plugin.stop().await;
}

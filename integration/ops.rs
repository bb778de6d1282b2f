//! Operations: metrics and health endpoints, the peer allow-list, process hygiene, and logs
//! that never carry secrets.

use tonic::Code;

use crate::common::*;
use kms_plugin::proto::v2::StatusRequest;

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let mut c = plugin.client().await;
    let st = status(&mut c).await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    decrypt(&mut c, &e).await.unwrap();
    let mut bad = decrypt_request(&e);
    bad.key_id = "local:unknown".into();
    assert_eq!(c.decrypt(bad).await.unwrap_err().code(), Code::NotFound);

    assert_eq!(plugin.http_get("/livez").await, (200, "ok\n".into()));
    assert_eq!(plugin.http_get("/readyz").await.0, 200);
    assert_eq!(plugin.http_get("/healthz").await.0, 200);
    assert_eq!(plugin.http_get("/nope").await.0, 404);
    let (code, m) = plugin.http_get("/metrics").await;
    assert_eq!(code, 200);
    let hash = kms_plugin::logging::KeyIdHash(&st.key_id).to_string();
    for needle in [
        "kms_plugin_grpc_requests_total{method=\"Encrypt\",code=\"OK\"} 1",
        "kms_plugin_grpc_requests_total{method=\"Decrypt\",code=\"OK\"} 1",
        "kms_plugin_grpc_requests_total{method=\"Decrypt\",code=\"NotFound\"} 1",
        "kms_plugin_grpc_request_duration_seconds_bucket{",
        "kms_plugin_backend_calls_total{op=\"wrap\",outcome=\"ok\"} 1",
        "kms_plugin_backend_calls_total{op=\"probe\",outcome=\"ok\"}",
        "kms_plugin_kek_rotations_total{reason=\"first\"} 1",
        "kms_plugin_kek_cache_hits_total 1",
        "kms_plugin_kek_cache_size 1",
        "kms_plugin_kek_uses 1",
        "kms_plugin_healthy 1",
        "kms_plugin_backend_healthy 1",
        "kms_plugin_root_key_revoked 0",
        &format!("kms_plugin_key_id_info{{key_id_hash=\"{hash}\"}} 1"),
        "kms_plugin_build_info{version=",
        "kms_plugin_http_connections_waited_total 0",
    ] {
        assert!(m.contains(needle), "missing {needle:?} in\n{m}");
    }
    assert!(m.ends_with("\n# EOF\n") && m.matches("# EOF").count() == 1, "{m}");
    plugin.stop().await;
}

#[tokio::test]
async fn readyz_fails_while_the_root_key_is_revoked() {
    let dir = Dir::new();
    let hsm = crate::common::softhsm::SoftHsm::new(&dir);
    hsm.keygen("root-1");
    let env = hsm.env();
    let config = hsm.config(&dir, "root-1", &[], &hsm.pin_file, "[probe]\ninterval = \"100ms\"");
    let plugin = Plugin::start_env(&config, &env).await;
    assert_eq!(plugin.http_get("/readyz").await.0, 200);
    hsm.delete("root-1");
    assert!(plugin.wait_log("root key unusable").await);
    let (code, body) = plugin.http_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("KeyUnusable"), "{body}");
    assert_eq!(
        plugin.http_get("/livez").await.0,
        200,
        "liveness must not restart a revoked plugin"
    );
    let (_, m) = plugin.http_get("/metrics").await;
    assert!(m.contains("kms_plugin_root_key_revoked 1"), "{m}");
    plugin.stop().await;
}

#[tokio::test]
async fn peer_allow_list() {
    let dir = Dir::new();
    let me = rustix::process::getuid().as_raw();
    let other = me + 4242;
    let key = dir.key("root.key").display().to_string();
    let config = |socket: &str, uid: u32| {
        dir.write_config(&format!(
            "[socket]\npath = {socket:?}\nallowed_uids = [{uid}]\n[backend]\ntype = \"local\"\ncurrent_key_file = {key:?}\n"
        ))
    };
    let refused = Plugin::spawn(
        &["serve", "--config", config(&dir.socket(), other).to_str().unwrap()],
        &dir.socket(),
    );
    assert!(refused.wait_log("serving KMS v2").await);
    // The server drops the connection at accept: the handshake or the first call fails.
    let refused_call = match refused.try_client().await {
        Ok(mut c) => c.status(StatusRequest {}).await.is_err(),
        Err(_) => true,
    };
    assert!(refused_call, "a peer not on the list must be refused");
    assert!(
        refused.wait_log("refused by the peer allow-list").await,
        "{}",
        refused.logs()
    );
    refused.stop().await;

    let socket = dir.path("ok/kms.sock").display().to_string();
    let allowed = Plugin::start(&config(&socket, me)).await;
    assert_eq!(status(&mut allowed.client().await).await.healthz, "ok");
    allowed.stop().await;
}

#[tokio::test]
async fn core_dumps_are_disabled() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", plugin.child.id())).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    plugin.stop().await;
}

#[tokio::test]
async fn trace_logs_carry_no_secrets() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "[kek]\nmax_uses = 3");
    let plugin = Plugin::start_traced(&config).await;
    let mut c = plugin.client().await;
    let mut secrets: Vec<Vec<u8>> = vec![std::fs::read(dir.key("root.key")).unwrap()];
    for _ in 0..8 {
        let seed = rand_bytes(32);
        let e = encrypt(&mut c, &seed).await;
        assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
        let mut bad = decrypt_request(&e);
        bad.ciphertext = bad.ciphertext.slice(..40);
        assert!(c.decrypt(bad).await.is_err());
        secrets.push(seed);
        secrets.push(e.ciphertext.to_vec());
    }
    let logs = plugin.stop_with_logs().await;
    assert!(logs.len() > 1000, "expected a trace-level workload log");
    leaks::assert_no_leaks(&logs, &secrets);
}

#[tokio::test]
async fn json_logs() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "[log]\nformat = \"json\"")).await;
    let mut c = plugin.client().await;
    encrypt(&mut c, &rand_bytes(32)).await;
    assert!(plugin.wait_log("\"method\":\"Encrypt\"").await, "{}", plugin.logs());
    let logs = plugin.logs();
    plugin.stop().await;
    for line in logs.lines() {
        assert!(line.starts_with('{') && line.ends_with('}'), "not a JSON line: {line}");
        assert!(line.contains("\"level\":") && line.contains("\"message\":"), "{line}");
    }
    // One line per call at debug, with the method and no payload.
    assert!(
        logs.lines()
            .any(|l| l.contains("\"message\":\"ok\"") && l.contains("\"method\":\"Encrypt\"")),
        "{logs}"
    );
}

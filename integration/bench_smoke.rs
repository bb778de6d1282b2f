//! The load generator, briefly, against a real plugin: every scenario completes its calls with
//! zero errors. Counts only; no timing is asserted.

use std::process::Command;

use crate::common::*;

const BENCH: &str = env!("CARGO_BIN_EXE_kms-bench");

/// Runs kms-bench with `args` plus `--json` and returns its one-line JSON report.
async fn bench(args: &[&str]) -> String {
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.push("--json".into());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BENCH)
            .args(&args)
            // Plugins that kms-bench starts inherit this: a free port each for their HTTP endpoint.
            .env("KMS_PLUGIN_METRICS__ADDRESS", "127.0.0.1:0")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        output.status.success(),
        "kms-bench failed ({:?}): {stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A number-valued top-level field of the report.
fn field(json: &str, key: &str) -> u64 {
    let needle = format!("\"{key}\":");
    let start = json.find(&needle).unwrap_or_else(|| panic!("no {key} in {json}")) + needle.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("{key} is not a number in {json}")) as u64
}

fn assert_clean(json: &str, calls: u64) {
    assert_eq!(field(json, "errors_total"), 0, "{json}");
    assert_eq!(field(json, "ops"), calls, "{json}");
    assert!(json.contains("\"errors\":{}"), "{json}");
}

#[tokio::test]
async fn every_scenario_runs_clean_against_the_plugin() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let socket = plugin.socket.clone();
    for scenario in ["status", "encrypt", "decrypt", "mixed"] {
        let json = bench(&[
            scenario,
            "--socket",
            &socket,
            "--count",
            "200",
            "--warmup",
            "0s",
            "--concurrency",
            "8",
            "--connections",
            "2",
        ])
        .await;
        assert!(json.contains(&format!("\"scenario\":\"{scenario}\"")), "{json}");
        assert_clean(&json, 200);
    }
    // A multi-threaded load generator too.
    let json = bench(&[
        "decrypt",
        "--socket",
        &socket,
        "--count",
        "200",
        "--warmup",
        "0s",
        "--threads",
        "2",
    ])
    .await;
    assert_clean(&json, 200);
    plugin.stop().await;
}

#[tokio::test]
async fn floor_runs_without_a_plugin() {
    let json = bench(&["floor", "--count", "200", "--warmup", "0s", "--concurrency", "4"]).await;
    assert_clean(&json, 200);
    assert!(field(&json, "request_bytes") > 0);
}

#[tokio::test]
async fn cold_start_unwraps_once_per_kek() {
    let json = bench(&[
        "cold-start",
        "--plugin",
        BIN,
        "--seeds",
        "300",
        "--keks",
        "3",
        "--latency",
        "20ms",
        "--concurrency",
        "16",
    ])
    .await;
    assert_clean(&json, 300);
    assert_eq!(field(&json, "distinct_keks_seen"), 3, "{json}");
    assert_eq!(field(&json, "unwraps"), 3, "{json}");
}

/// Runs kms-bench in `cwd` with `args` as given; returns (success, stdout, stderr).
fn bench_in(cwd: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BENCH)
        .current_dir(cwd)
        .args(args)
        .env("KMS_PLUGIN_METRICS__ADDRESS", "127.0.0.1:0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn startup_reports_each_start() {
    // No --plugin: the kms-plugin next to kms-bench, whatever the current directory.
    let json = bench(&["startup", "--repeat", "2"]).await;
    assert_clean(&json, 2);
    assert!(!json.contains("ops_per_sec"), "{json}");
    let dir = Dir::new();
    let (ok, text, err) = tokio::task::spawn_blocking(move || bench_in(&dir.path(""), &["startup", "--repeat", "1"]))
        .await
        .unwrap();
    assert!(ok, "{text}{err}");
    assert!(text.contains("calls 1  errors 0"), "{text}");
    assert!(!text.contains("throughput"), "startup has no throughput: {text}");
}

#[tokio::test]
async fn a_relative_socket_is_taken_from_the_current_directory() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let socket = std::path::PathBuf::from(&plugin.socket);
    let (parent, name) = (
        socket.parent().unwrap().to_owned(),
        socket.file_name().unwrap().to_owned(),
    );
    let (ok, text, err) = tokio::task::spawn_blocking(move || {
        bench_in(
            &parent,
            &[
                "decrypt",
                "--socket",
                name.to_str().unwrap(),
                "--count",
                "2",
                "--warmup",
                "0s",
                "--seeds",
                "1",
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{text}{err}");
    assert!(text.contains("calls 2  errors 0"), "{text}");
    plugin.stop().await;
}

#[test]
fn each_scenario_has_its_own_help() {
    let (ok, help, err) = bench_in(std::path::Path::new("/"), &["decrypt", "--help"]);
    assert!(ok, "{err}");
    assert!(help.starts_with("Hot Decrypt"), "{help}");
    assert!(help.contains("--socket <SOCKET>") && help.contains("--seeds"), "{help}");
    // Options of other scenarios are not offered.
    for other in ["--repeat", "--keks", "--echo-threads", "--mix", "--plugin"] {
        assert!(!help.contains(other), "{other} in decrypt's help:\n{help}");
    }
    let (_, help, _) = bench_in(std::path::Path::new("/"), &["--help"]);
    for scenario in [
        "status",
        "encrypt",
        "decrypt",
        "mixed",
        "tampered",
        "floor",
        "cold-start",
        "startup",
    ] {
        assert!(help.contains(&format!("  {scenario} ")), "{scenario} missing:\n{help}");
    }
}

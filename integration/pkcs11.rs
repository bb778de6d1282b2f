//! The PKCS#11 backend end to end against a real SoftHSM2 token: what only PKCS#11 has. Round
//! trip, rotation, revocation, outage, coalescing and the PIN log scan are in the shared suite
//! (integration/suite/).

use tonic::Code;

use crate::common::softhsm::{self, SoftHsm};

/// OpenSC's PKCS#11 spy module (package opensc-pkcs11, installed with opensc).
const SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so";
use crate::common::*;
use kms_plugin::proto::v2::StatusRequest;

#[tokio::test]
async fn missing_key_at_start_up_is_a_clear_error() {
    let dir = Dir::new();
    let hsm = SoftHsm::new(&dir);
    hsm.keygen("root-1");
    let config = hsm.config(&dir, "no-such-key", &[], &hsm.pin_file, "");
    let env = hsm.env();
    let mut plugin = Plugin::spawn_env(&["serve", "--config", config.to_str().unwrap()], &dir.socket(), &env);
    assert!(!plugin.wait_exit().await.success());
    assert!(
        plugin.wait_log("no secret key labelled \"no-such-key\"").await,
        "{}",
        plugin.logs()
    );
    assert!(
        !std::path::Path::new(&dir.socket()).exists(),
        "must fail before binding"
    );
}

#[tokio::test]
async fn unknown_token_label_lists_the_labels_seen() {
    let dir = Dir::new();
    let hsm = SoftHsm::new(&dir);
    hsm.keygen("root-1");
    let config = hsm.config(&dir, "root-1", &[], &hsm.pin_file, "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(&hsm.token, "no-such-token")).unwrap();
    let out = hsm
        .cmd(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    // Exactly the initialised tokens (SoftHSM2's blank spare one is left out).
    assert!(
        stderr.trim_end().ends_with(&format!(
            "no PKCS#11 token labelled \"no-such-token\"; tokens seen: \"{}\"",
            hsm.token
        )),
        "{stderr}"
    );
    // A module with no initialised token says so.
    let empty = dir.path("empty-tokens");
    std::fs::create_dir_all(&empty).unwrap();
    let conf = dir.path("empty-softhsm2.conf");
    std::fs::write(&conf, format!("directories.tokendir = {}\n", empty.display())).unwrap();
    let out = hsm
        .cmd(BIN)
        .env("SOFTHSM2_CONF", &conf)
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no PKCS#11 token labelled \"no-such-token\": the module shows no initialised token"),
        "{stderr}"
    );
}

#[tokio::test]
async fn wrong_pin_is_reported_once_and_never_retried() {
    let dir = Dir::new();
    let hsm = SoftHsm::new(&dir);
    hsm.keygen("root-1");
    let wrong = dir.path("wrong-pin");
    std::fs::write(&wrong, "000000\n").unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // OpenSC's PKCS#11 spy sits between the plugin and SoftHSM2 and logs every call the token
    // gets: the count of C_Login is what the token saw, whatever the plugin logs.
    let config = hsm.config(&dir, "root-1", &[], &wrong, "[probe]\ninterval = \"50ms\"");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(softhsm::MODULE, SPY)).unwrap();
    let spy_log = dir.path("pkcs11-spy.log");
    let mut env = hsm.env();
    env.push(("PKCS11SPY", softhsm::MODULE.to_string()));
    env.push(("PKCS11SPY_OUTPUT", spy_log.display().to_string()));
    let logins = || {
        std::fs::read_to_string(&spy_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with("C_Login"))
            .count()
    };
    let plugin = Plugin::spawn_env(&["serve", "--config", config.to_str().unwrap()], &dir.socket(), &env);
    // The plugin stays up (a supervisor restart loop would retry the PIN) and Status says why.
    assert!(plugin.wait_log("serving KMS v2").await, "{}", plugin.logs());
    let mut c = plugin.client().await;
    let err = c.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Many probe intervals later the token was still asked for the PIN only once.
    let probes = plugin.backend_calls("probe").await;
    eventually("ten more probes", || async {
        plugin.backend_calls("probe").await >= probes + 10
    })
    .await;
    assert_eq!(
        logins(),
        1,
        "C_Login calls the token got; plugin logs:\n{}",
        plugin.logs()
    );
    assert_eq!(
        c.status(StatusRequest {}).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // `check` reports it and exits non-zero.
    let out = hsm
        .cmd(BIN)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PIN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    plugin.stop().await;
}

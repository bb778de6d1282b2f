//! Socket hygiene and shutdown, each case against the real binary.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use crate::common::*;

#[tokio::test]
async fn creates_parent_dir_and_sets_modes() {
    let dir = Dir::new();
    let socket = dir.path("a/b/kms.sock");
    let plugin = Plugin::start(&dir.config(socket.to_str().unwrap(), "root.key", &[], "")).await;
    let parent = fs::metadata(dir.path("a/b")).unwrap();
    assert_eq!(parent.mode() & 0o777, 0o750);
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o600);
    plugin.stop().await;
    assert!(!socket.exists(), "socket must be removed on shutdown");

    // A group this process has (so the chown works without root), given as a number.
    let gid = rustix::process::getegid().as_raw();
    let extra = format!("[socket]\nmode = \"0660\"\ngroup = \"{gid}\"");
    // `extra` sets [socket] already; write this config by hand.
    let cfg = dir.path("group.toml");
    fs::write(
        &cfg,
        format!(
            "{extra}\npath = {:?}\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\n",
            socket.to_str().unwrap(),
            dir.key("root.key").to_str().unwrap()
        ),
    )
    .unwrap();
    let plugin = Plugin::start(&cfg).await;
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    plugin.stop().await;
}

#[tokio::test]
async fn replaces_a_stale_socket() {
    let dir = Dir::new();
    let socket = dir.socket();
    fs::create_dir_all(dir.path("run")).unwrap();
    // A socket file whose server is gone, as a crash leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(fs::symlink_metadata(&socket).unwrap().file_type().is_socket());
    let plugin = Plugin::start(&dir.config(&socket, "root.key", &[], "")).await;
    assert_eq!(status(&mut plugin.client().await).await.healthz, "ok");
    assert!(plugin.wait_log("stale socket").await);
    plugin.stop().await;
}

#[tokio::test]
async fn refuses_a_live_socket() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "");
    let first = Plugin::start(&config).await;
    let mut second = Plugin::spawn(&["serve", "--config", config.to_str().unwrap()], &dir.socket());
    let exit = second.wait_exit().await;
    assert!(!exit.success());
    assert!(second.wait_log("already listening").await, "{}", second.logs());
    // The first server is untouched and still answers on its socket.
    assert_eq!(status(&mut first.client().await).await.healthz, "ok");
    first.stop().await;
}

#[tokio::test]
async fn refuses_a_path_that_is_not_a_socket() {
    let dir = Dir::new();
    fs::create_dir_all(dir.path("run")).unwrap();
    fs::write(dir.socket(), b"precious").unwrap();
    let config = dir.config(&dir.socket(), "root.key", &[], "");
    let mut plugin = Plugin::spawn(&["serve", "--config", config.to_str().unwrap()], &dir.socket());
    assert!(!plugin.wait_exit().await.success());
    assert!(plugin.wait_log("not a socket").await, "{}", plugin.logs());
    assert_eq!(fs::read(dir.socket()).unwrap(), b"precious");
}

#[tokio::test]
async fn serves_an_abstract_socket() {
    let dir = Dir::new();
    let name = format!("@kms-plugin-test-{}", rand_hex(6));
    let plugin = Plugin::start(&dir.config(&name, "root.key", &[], "")).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    // A second server on the same abstract name is refused.
    let config = dir.config(&name, "root.key", &[], "");
    let mut second = Plugin::spawn(&["serve", "--config", config.to_str().unwrap()], &name);
    assert!(!second.wait_exit().await.success());
    assert!(second.wait_log("already listening").await, "{}", second.logs());
    plugin.stop().await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_calls_then_removes_the_socket() {
    let dir = Dir::new();
    let writer = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut writer.client().await, &seed).await;
    writer.stop().await;

    // A slow backend keeps a cold Decrypt in flight while SIGTERM arrives.
    let extra = "shutdown_grace = \"10s\"\n[bench]\nbackend_latency = \"2s\"";
    let mut plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], extra)).await;
    let mut c = plugin.client().await;
    let call = tokio::spawn(async move { decrypt(&mut c, &e).await });
    plugin.wait_unwrap_in_flight().await;
    plugin.signal("TERM");
    let plaintext = call.await.unwrap().expect("in-flight call must complete");
    assert_eq!(plaintext, seed);
    assert!(plugin.wait_exit().await.success(), "{}", plugin.logs());
    assert!(!std::path::Path::new(&dir.socket()).exists());
}

#[tokio::test]
async fn sigint_stops_cleanly_and_grace_bounds_shutdown() {
    let dir = Dir::new();
    let writer = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let e = encrypt(&mut writer.client().await, &rand_bytes(32)).await;
    writer.stop().await;

    // A call slower than the grace period is cut off; the process still exits 0.
    let extra = "shutdown_grace = \"200ms\"\n[bench]\nbackend_latency = \"3s\"";
    let mut plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], extra)).await;
    let mut c = plugin.client().await;
    let call = tokio::spawn(async move { decrypt(&mut c, &e).await });
    plugin.wait_unwrap_in_flight().await;
    plugin.signal("INT");
    assert!(plugin.wait_exit().await.success(), "{}", plugin.logs());
    assert!(call.await.unwrap().is_err());
    assert!(plugin.wait_log("grace period elapsed").await);
    assert!(!std::path::Path::new(&dir.socket()).exists());
}

/// A pod's `emptyDir` is created mode 0777: refused as a socket directory unless the operator
/// says it is private to the pod (OpenShift's one-socket-per-key sidecars), and then served.
#[tokio::test]
async fn an_emptydir_socket_directory_needs_the_pod_private_opt_in() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Dir::new();
    let shared = dir.path("emptydir");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = shared.join("kms-key1.sock").display().to_string();
    let key = dir.key("root.key").display().to_string();
    let config = |extra: &str| {
        dir.write_config(&format!(
            "[socket]\npath = {socket:?}\n{extra}\n[backend]\ntype = \"local\"\ncurrent_key_file = {key:?}\n"
        ))
    };

    let refused = config("");
    let mut plugin = Plugin::spawn(&["serve", "--config", refused.to_str().unwrap()], &socket);
    assert!(!plugin.wait_exit().await.success());
    assert!(
        plugin.logs().contains("is writable by group or others"),
        "{}",
        plugin.logs()
    );

    let opted_in = config("directory_private_to_pod = true");
    let plugin = Plugin::start(&opted_in).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    assert!(
        plugin.wait_log("socket.directory_private_to_pod is set").await,
        "{}",
        plugin.logs()
    );
    plugin.stop().await;
}

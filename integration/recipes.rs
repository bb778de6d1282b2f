//! The distribution recipes in deploy/ (k3s, RKE2, OpenShift) and docs/talos.md, tested as far
//! as this machine allows: every YAML file parses (PyYAML, from the project venv, as
//! integration/deploy.rs uses it), the recipes agree with deploy/config.toml and
//! deploy/encryption-config.yaml, and every systemd unit and drop-in passes
//! `systemd-analyze verify` in a temporary root with the built binary installed. A running
//! k3s, RKE2 or OpenShift is not available here; the end-to-end suite starts a real
//! kube-apiserver on each recipe's EncryptionConfiguration (integration/e2e/recipes.rs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::BIN;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `.yaml` file under the recipe directories, and the shared EncryptionConfiguration.
fn yaml_files() -> Vec<String> {
    let mut out = vec!["deploy/encryption-config.yaml".to_string()];
    for dir in ["deploy/k3s", "deploy/rke2", "deploy/openshift"] {
        let mut names: Vec<String> = std::fs::read_dir(Path::new(ROOT).join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        names.sort();
        assert!(!names.is_empty(), "{dir} has no YAML");
        out.extend(names.into_iter().map(|n| format!("{dir}/{n}")));
    }
    out
}

/// Each file's documents as PyYAML reads them (YAML 1.1, as Go's YAML readers do).
fn parse_all(files: &[String]) -> BTreeMap<String, Vec<Value>> {
    let python = Path::new(ROOT).join(".venv/bin/python");
    let out = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             print(json.dumps({p: list(yaml.safe_load_all(open(p))) for p in sys.argv[1:]}))",
        ])
        .args(files)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run integration/test.sh (it creates the venv)",
                python.display()
            )
        });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// The kube-apiserver arguments of a k3s/RKE2 config drop-in: (encryption config path, reload).
fn apiserver_args(doc: &Value, file: &str) -> (String, bool) {
    let args = strings(&doc["kube-apiserver-arg+"]);
    let path = args
        .iter()
        .find_map(|a| a.strip_prefix("encryption-provider-config="))
        .unwrap_or_else(|| panic!("{file}: no encryption-provider-config in {args:?}"));
    let reload = args.contains(&"encryption-provider-config-automatic-reload=true");
    (path.to_string(), reload)
}

#[test]
fn recipes_parse_and_agree_with_the_plugin_config() {
    let files = yaml_files();
    let docs = parse_all(&files);
    let settings = kms_plugin::settings::Settings::from_toml(&read("deploy/config.toml")).unwrap();
    let socket = settings.socket.path.clone();
    // OpenShift's apiserver dials this fixed path; the other recipes share it.
    assert_eq!(socket, "/var/run/kmsplugin/kms.sock");
    let enc = &docs["deploy/encryption-config.yaml"][0];
    let endpoint = enc["resources"][0]["providers"][0]["kms"]["endpoint"].as_str().unwrap();
    assert_eq!(endpoint, format!("unix://{socket}"));

    // k3s and RKE2: the EncryptionConfiguration's path in the args is where the README installs
    // deploy/encryption-config.yaml, and automatic reload is on.
    for (distro, dir) in [("k3s", "/etc/rancher/k3s/kms"), ("rke2", "/etc/rancher/rke2/kms")] {
        let file = format!("deploy/{distro}/config.yaml");
        let (path, reload) = apiserver_args(&docs[&file][0], &file);
        assert_eq!(path, format!("{dir}/encryption-config.yaml"), "{file}");
        assert!(reload, "{file}: automatic reload is off");
        let readme = read(&format!("deploy/{distro}/README.md"));
        assert!(
            readme.contains(&format!("deploy/encryption-config.yaml {path}")),
            "deploy/{distro}/README.md does not install the EncryptionConfiguration at {path}"
        );
        assert!(readme.contains(&format!(
            "deploy/{distro}/config.yaml /etc/rancher/{distro}/config.yaml.d/"
        )));
    }
    assert!(read("deploy/k3s/README.md").contains("`k3s secrets-encrypt` does not manage KMS providers"));

    // RKE2's apiserver is a container: the socket directory and the config's directory are
    // mounted into it at the paths the EncryptionConfiguration and the args name.
    let mounts = strings(&docs["deploy/rke2/config.yaml"][0]["kube-apiserver-extra-mount+"]);
    let socket_dir = Path::new(&socket).parent().unwrap().to_str().unwrap();
    let mounted = |container: &str| {
        mounts.iter().any(|m| {
            let parts: Vec<&str> = m.split(':').collect();
            parts.len() >= 2 && parts[1] == container
        })
    };
    assert!(mounted(socket_dir), "rke2: no mount of {socket_dir} in {mounts:?}");
    assert!(
        mounted("/etc/rancher/rke2/kms"),
        "rke2: the EncryptionConfiguration is not mounted"
    );

    // OpenShift: the MachineConfig's tmpfiles line is deploy/kms-plugin.yaml's, and the
    // DaemonSet serves the fixed socket directory as the manifest's user.
    let mc = &docs["deploy/openshift/machineconfig.yaml"][0];
    let source = mc["spec"]["config"]["storage"]["files"][0]["contents"]["source"]
        .as_str()
        .unwrap();
    let line = percent_decode(source.strip_prefix("data:,").unwrap());
    assert!(
        read("deploy/kms-plugin.yaml").contains(&format!("echo '{}'", line.trim_end())),
        "the MachineConfig's tmpfiles line {line:?} is not deploy/kms-plugin.yaml's"
    );
    assert_eq!(mc["spec"]["config"]["storage"]["files"][0]["mode"], 0o644);
    let ds = docs["deploy/openshift/kms-plugin-daemonset.yaml"]
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["runAsGroup"], 0);
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == socket_dir)
        .expect("the socket directory is mounted");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["hostPath"]["path"], socket_dir);
    assert_eq!(volume["hostPath"]["type"], "Directory");

    let talos = read("docs/talos.md");
    assert!(talos.contains("https://github.com/siderolabs/talos/issues/10899"));
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A temporary root with the system's own units (targets the verify needs), the built binary
/// at /usr/local/bin/kms-plugin, and stubs for the units the recipes hook into.
fn unit_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let status = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd").tap_mkdir())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::copy(BIN, r.join("usr/local/bin").tap_mkdir().join("kms-plugin")).unwrap();
    std::fs::copy("/usr/bin/true", r.join("usr/bin").tap_mkdir().join("true")).unwrap();
    let etc = r.join("etc/systemd/system").tap_mkdir();
    for stub in ["k3s.service", "rke2-server.service"] {
        std::fs::write(
            etc.join(stub),
            "[Unit]\nDescription=stub\n[Service]\nExecStart=/usr/bin/true\n",
        )
        .unwrap();
    }
    root
}

trait MkDir {
    fn tap_mkdir(self) -> PathBuf;
}

impl MkDir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// `systemd-analyze --root verify` of `units`: (passed with no warning at all, output).
fn verify(root: &Path, units: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        .arg("verify")
        .args(units)
        .output()
        .expect("systemd-analyze (integration/deps.sh installs systemd)");
    let (ok, text) = crate::common::outcome(&out);
    (ok && text.trim().is_empty(), text)
}

#[test]
fn systemd_units_and_drop_ins_pass_systemd_analyze_verify() {
    let root = unit_root();
    let etc = root.path().join("etc/systemd/system");
    std::fs::copy(
        Path::new(ROOT).join("deploy/systemd/kms-plugin.service"),
        etc.join("kms-plugin.service"),
    )
    .unwrap();
    for (distro, unit) in [("k3s", "k3s.service"), ("rke2", "rke2-server.service")] {
        let dropin = etc.join(format!("{unit}.d")).tap_mkdir();
        std::fs::copy(
            Path::new(ROOT).join(format!("deploy/{distro}/{unit}.d/10-kms-plugin.conf")),
            dropin.join("10-kms-plugin.conf"),
        )
        .unwrap();
    }
    let (ok, text) = verify(
        root.path(),
        &["kms-plugin.service", "k3s.service", "rke2-server.service"],
    );
    assert!(ok, "{text}");

    // Ordering: the plugin before each distribution's apiserver unit, and each drop-in pulls
    // the plugin in.
    let unit = read("deploy/systemd/kms-plugin.service");
    let before = unit.lines().find(|l| l.starts_with("Before=")).unwrap();
    for apiserver in ["kube-apiserver.service", "k3s.service", "rke2-server.service"] {
        assert!(before.split_whitespace().any(|u| u.ends_with(apiserver)), "{before}");
    }
    for dropin in [
        "deploy/k3s/k3s.service.d/10-kms-plugin.conf",
        "deploy/rke2/rke2-server.service.d/10-kms-plugin.conf",
    ] {
        let text = read(dropin);
        assert!(
            text.contains("Wants=kms-plugin.service") && text.contains("After=kms-plugin.service"),
            "{dropin}"
        );
    }

    // The check can fail: a misspelt key in a drop-in is reported.
    let bad = etc.join("k3s.service.d/20-typo.conf");
    std::fs::write(&bad, "[Unit]\nWant=kms-plugin.service\n").unwrap();
    let (ok, text) = verify(root.path(), &["k3s.service"]);
    assert!(!ok && text.contains("Unknown key"), "{text}");
}

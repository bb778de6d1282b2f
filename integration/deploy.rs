//! The files in `deploy/` agree with each other and with the plugin's own configuration: one
//! socket path, one probe address, a hardened static pod, `kms` (v2) before `identity`.
//!
//! There is no YAML crate among the dependencies, so a reader for the block-style subset these
//! files use is at the bottom; it refuses anything outside that subset.
//! `yaml_reader_agrees_with_pyyaml` checks that it and PyYAML read every file the same way, with
//! the project venv's interpreter (`.venv/bin/python`, which `integration/test.sh` sets up with
//! PyYAML); it fails when that interpreter or PyYAML is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use kms_plugin::server::socket::SocketAddress;
use kms_plugin::settings::{BackendSettings, Settings};

const YAML_FILES: [&str; 3] = [
    "encryption-config.yaml",
    "kms-plugin.yaml",
    "kubeadm/kube-apiserver-patch.yaml",
];

fn deploy_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(rel)
}

fn read(rel: &str) -> String {
    let path = deploy_path(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(rel: &str) -> Yaml {
    parse_yaml(rel, &read(rel))
}

/// deploy/config.toml, parsed by the plugin itself.
fn plugin_config() -> Settings {
    Settings::from_toml(&read("config.toml")).unwrap_or_else(|e| panic!("deploy/config.toml: {e}"))
}

/// The socket file in deploy/config.toml (must be a path: abstract sockets cannot be shared
/// through a hostPath and have no permissions).
fn socket_file(settings: &Settings) -> PathBuf {
    match settings.socket.path.parse::<SocketAddress>() {
        Ok(SocketAddress::Path(p)) => p,
        other => panic!("deploy/config.toml: socket.path must be a filesystem path, got {other:?}"),
    }
}

fn socket_dir(settings: &Settings) -> String {
    socket_file(settings).parent().unwrap().display().to_string()
}

/// /var/run is a symlink to /run on every systemd host.
fn normalize_run(path: &str) -> String {
    match path.strip_prefix("/var/run/") {
        Some(rest) => format!("/run/{rest}"),
        None => path.to_string(),
    }
}

fn the_container(pod: &Yaml) -> &Yaml {
    let containers = pod.req("spec").req("containers").list();
    assert_eq!(containers.len(), 1, "kms-plugin.yaml: expected one container");
    assert!(
        pod.req("spec").get("initContainers").is_none(),
        "kms-plugin.yaml: no init containers expected"
    );
    &containers[0]
}

fn volume<'a>(pod: &'a Yaml, name: &str) -> &'a Yaml {
    pod.req("spec")
        .req("volumes")
        .list()
        .iter()
        .find(|v| v.req("name").str() == name)
        .unwrap_or_else(|| panic!("kms-plugin.yaml: no volume named {name}"))
}

/// The container's mount at `mount_path` and the host path behind it.
fn mount_at<'a>(pod: &'a Yaml, mount_path: &str) -> (&'a Yaml, &'a Yaml) {
    let mount = the_container(pod)
        .req("volumeMounts")
        .list()
        .iter()
        .find(|m| m.req("mountPath").str() == mount_path)
        .unwrap_or_else(|| panic!("kms-plugin.yaml: nothing mounted at {mount_path}"));
    (mount, volume(pod, mount.req("name").str()).req("hostPath"))
}

fn is_read_only(mount: &Yaml) -> bool {
    mount.get("readOnly").is_some_and(|v| v.str() == "true")
}

/// A security setting as the kubelet applies it: the container's value, else the pod's.
fn effective<'a>(pod: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    the_container(pod)
        .req("securityContext")
        .get(key)
        .or_else(|| pod.req("spec").get("securityContext").and_then(|s| s.get(key)))
}

fn command(pod: &Yaml) -> Vec<&str> {
    the_container(pod).req("command").list().iter().map(Yaml::str).collect()
}

fn config_flag<'a>(args: &[&'a str]) -> &'a str {
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .unwrap_or_else(|| panic!("no --config in {args:?}"));
    args.get(at + 1)
        .unwrap_or_else(|| panic!("--config without a value in {args:?}"))
}

/// `Key=Value` lines of a systemd unit section, in order (keys may repeat).
fn unit_entries(section: &str) -> Vec<(String, String)> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in read("systemd/kms-plugin.service").lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            current = line.to_string();
        } else if current == section {
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("kms-plugin.service: {line:?}"));
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn unit_value(entries: &[(String, String)], key: &str) -> String {
    let values: Vec<&String> = entries.iter().filter(|(k, _)| k == key).map(|(_, v)| v).collect();
    assert_eq!(
        values.len(),
        1,
        "kms-plugin.service: expected one {key}=, found {values:?}"
    );
    values[0].clone()
}

#[test]
fn socket_path_is_the_same_everywhere() {
    let settings = plugin_config();
    let socket = socket_file(&settings);
    let dir = socket_dir(&settings);

    // kube-apiserver dials the endpoint of every kms provider.
    let enc = yaml("encryption-config.yaml");
    let mut endpoints = 0;
    for entry in enc.req("resources").list() {
        for provider in entry.req("providers").list() {
            if let Some(kms) = provider.get("kms") {
                let endpoint = kms.req("endpoint").str();
                assert!(
                    endpoint.starts_with("unix:///"),
                    "encryption-config.yaml: endpoint {endpoint:?} needs unix:///"
                );
                assert_eq!(
                    endpoint.parse::<SocketAddress>(),
                    Ok(SocketAddress::Path(socket.clone())),
                    "encryption-config.yaml endpoint vs deploy/config.toml socket.path"
                );
                endpoints += 1;
            }
        }
    }
    assert!(endpoints > 0, "encryption-config.yaml: no kms provider");

    // The plugin creates the socket in a host directory it shares with the apiserver.
    let pod = yaml("kms-plugin.yaml");
    let (mount, host) = mount_at(&pod, &dir);
    assert_eq!(host.req("path").str(), dir, "kms-plugin.yaml: socket hostPath");
    assert_eq!(
        host.req("type").str(),
        "DirectoryOrCreate",
        "kms-plugin.yaml: socket hostPath type"
    );
    assert!(
        !is_read_only(mount),
        "kms-plugin.yaml: the plugin must be able to create its socket"
    );

    // kube-apiserver mounts the same directory.
    let kubeadm = yaml("kubeadm/kube-apiserver-patch.yaml");
    let shared = kubeadm
        .req("apiServer")
        .req("extraVolumes")
        .list()
        .iter()
        .find(|v| v.req("mountPath").str() == dir)
        .unwrap_or_else(|| panic!("kube-apiserver-patch.yaml: {dir} not mounted"));
    assert_eq!(
        shared.req("hostPath").str(),
        dir,
        "kube-apiserver-patch.yaml: socket hostPath"
    );

    // The systemd unit may write there and nowhere else.
    let service = unit_entries("[Service]");
    assert_eq!(
        format!("/run/{}", unit_value(&service, "RuntimeDirectory")),
        normalize_run(&dir),
        "kms-plugin.service: RuntimeDirectory"
    );
    assert_eq!(
        normalize_run(&unit_value(&service, "ReadWritePaths")),
        normalize_run(&dir),
        "kms-plugin.service: ReadWritePaths"
    );
}

#[test]
fn static_pod_is_hardened() {
    let pod = yaml("kms-plugin.yaml");
    assert_eq!(pod.req("apiVersion").str(), "v1");
    assert_eq!(pod.req("kind").str(), "Pod");
    assert_eq!(pod.req("metadata").req("namespace").str(), "kube-system");
    let spec = pod.req("spec");
    assert_eq!(spec.req("hostNetwork").str(), "true", "hostNetwork");
    assert_eq!(spec.req("priorityClassName").str(), "system-node-critical");
    for shared in ["hostPID", "hostIPC"] {
        assert!(spec.get(shared).is_none_or(|v| v.str() == "false"), "{shared}");
    }

    let sc = the_container(&pod).req("securityContext");
    assert_eq!(sc.req("readOnlyRootFilesystem").str(), "true", "readOnlyRootFilesystem");
    assert_eq!(
        sc.req("allowPrivilegeEscalation").str(),
        "false",
        "allowPrivilegeEscalation"
    );
    assert!(sc.get("privileged").is_none_or(|v| v.str() == "false"), "privileged");
    let caps = sc.req("capabilities");
    assert!(
        caps.req("drop").list().iter().any(|c| c.str() == "ALL"),
        "capabilities.drop must contain ALL"
    );
    assert!(caps.get("add").is_none(), "no capabilities may be added");
    let seccomp = effective(&pod, "seccompProfile").expect("seccompProfile");
    assert_eq!(seccomp.req("type").str(), "RuntimeDefault", "seccompProfile.type");
    assert_eq!(
        effective(&pod, "runAsNonRoot").map(Yaml::str),
        Some("true"),
        "runAsNonRoot"
    );
    let uid = effective(&pod, "runAsUser").expect("a fixed runAsUser").str();
    assert_ne!(uid.parse::<u32>().expect("numeric runAsUser"), 0, "runAsUser");

    // The plugin can only chown its socket to a group it is a member of.
    let settings = plugin_config();
    if let Some(group) = &settings.socket.group {
        let gid: u32 = group
            .parse()
            .expect("config.toml: use a numeric socket.group in the pod");
        let primary = effective(&pod, "runAsGroup").map(|g| g.str().parse::<u32>().unwrap());
        let supplementary: Vec<u32> = spec
            .get("securityContext")
            .and_then(|s| s.get("supplementalGroups"))
            .map(|g| g.list().iter().map(|x| x.str().parse().unwrap()).collect())
            .unwrap_or_default();
        assert!(
            primary == Some(gid) || supplementary.contains(&gid),
            "socket.group {gid} is neither runAsGroup ({primary:?}) nor in supplementalGroups {supplementary:?}"
        );
        assert_eq!(settings.socket.mode, 0o660, "socket.mode with a socket group");
    }

    // Everything but the socket directory is mounted read-only.
    let dir = socket_dir(&settings);
    for mount in the_container(&pod).req("volumeMounts").list() {
        let path = mount.req("mountPath").str();
        assert!(
            path == dir || is_read_only(mount),
            "kms-plugin.yaml: {path} must be readOnly"
        );
    }

    // The config file the plugin is started with comes from the host, read-only.
    let args = command(&pod);
    let config = config_flag(&args);
    let (mount, host) = mount_at(&pod, config);
    assert!(is_read_only(mount));
    assert_eq!(host.req("path").str(), config);
    assert_eq!(host.req("type").str(), "File");

    // Every root-key file the config names is under a read-only mount.
    let BackendSettings::Local(local) = &settings.backend else {
        panic!("deploy/config.toml: the pod is written for the local backend");
    };
    let mounts = the_container(&pod).req("volumeMounts").list();
    for key in std::iter::once(&local.current_key_file).chain(&local.decrypt_only_key_files) {
        let covered = mounts
            .iter()
            .any(|m| key.starts_with(m.req("mountPath").str()) && is_read_only(m));
        assert!(covered, "{} is not under a read-only mount", key.display());
    }

    let resources = the_container(&pod).req("resources");
    for (kind, what) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
        resources.req(kind).req(what);
    }
}

#[test]
fn probes_use_the_metrics_address() {
    let settings = plugin_config();
    assert!(
        settings.metrics.enabled,
        "deploy/config.toml: the probes need [metrics]"
    );
    let address: SocketAddr = settings.metrics.address;
    assert!(address.ip().is_loopback(), "metrics.address must stay on loopback");

    let pod = yaml("kms-plugin.yaml");
    let container = the_container(&pod);
    for (probe, path) in [
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/livez"),
    ] {
        let get = container.req(probe).req("httpGet");
        assert_eq!(get.req("path").str(), path, "{probe}.httpGet.path");
        assert_eq!(
            get.req("port").str(),
            address.port().to_string(),
            "{probe}.httpGet.port vs metrics.address"
        );
        assert_eq!(
            get.req("host").str(),
            address.ip().to_string(),
            "{probe}.httpGet.host vs metrics.address (hostNetwork: the node's loopback)"
        );
    }
}

#[test]
fn encryption_config_puts_kms_v2_before_identity() {
    let enc = yaml("encryption-config.yaml");
    assert_eq!(enc.req("apiVersion").str(), "apiserver.config.k8s.io/v1");
    assert_eq!(enc.req("kind").str(), "EncryptionConfiguration");
    let entries = enc.req("resources").list();
    assert!(
        entries[0].req("resources").list().iter().any(|r| r.str() == "secrets"),
        "secrets must be encrypted"
    );
    for entry in entries {
        let providers = entry.req("providers").list();
        let kms = providers
            .iter()
            .position(|p| p.get("kms").is_some())
            .expect("a kms provider");
        let identity = providers
            .iter()
            .position(|p| p.get("identity").is_some())
            .expect("identity, until all data is encrypted");
        assert_eq!(kms, 0, "kms must be the first provider (it encrypts new writes)");
        assert_eq!(identity, providers.len() - 1, "identity must be the last provider");
        let kms = providers[kms].req("kms");
        assert_eq!(kms.req("apiVersion").str(), "v2", "kms.apiVersion (v1 is the default)");
        assert_eq!(kms.req("name").str(), "kms-plugin");
        assert!(!kms.req("name").str().contains(':'), "kms.name may not contain ':'");
        kms.req("timeout");
    }
}

#[test]
fn kubeadm_patch_points_at_the_encryption_config() {
    let kubeadm = yaml("kubeadm/kube-apiserver-patch.yaml");
    assert_eq!(kubeadm.req("kind").str(), "ClusterConfiguration");
    let api = kubeadm.req("apiServer");
    let flag = api
        .req("extraArgs")
        .list()
        .iter()
        .find(|a| a.req("name").str() == "encryption-provider-config")
        .expect("--encryption-provider-config");
    let file = Path::new(flag.req("value").str());
    assert_eq!(file.file_name().unwrap(), "encryption-config.yaml");
    let dir = file.parent().unwrap().display().to_string();
    let mount = api
        .req("extraVolumes")
        .list()
        .iter()
        .find(|v| v.req("mountPath").str() == dir)
        .unwrap_or_else(|| panic!("{dir} is not mounted into kube-apiserver"));
    assert!(is_read_only(mount), "{dir} must be mounted read-only");
}

#[test]
fn binary_and_config_paths_agree() {
    let pod = yaml("kms-plugin.yaml");
    let args = command(&pod);
    let service = unit_entries("[Service]");
    let exec = unit_value(&service, "ExecStart");
    let exec: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(exec[0], args[0], "ExecStart binary vs the pod's command");
    assert_eq!(exec[1], "serve");
    assert_eq!(
        config_flag(&exec),
        config_flag(&args),
        "--config in the unit vs the pod"
    );

    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("LimitCORE", "0"),
        ("LimitNOFILE", "4096"),
        ("ProtectSystem", "strict"),
    ] {
        assert_eq!(unit_value(&service, key), want, "kms-plugin.service: {key}");
    }

    // Both image builds (scripts/image.sh, deploy/Dockerfile) take their layout from
    // scripts/image-rootfs.sh and start the binary the pod names.
    let rootfs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image-rootfs.sh")).unwrap();
    assert!(
        rootfs.contains(&format!("\"$out\"{}", args[0])),
        "scripts/image-rootfs.sh does not install the binary at {}",
        args[0]
    );
    let entrypoint = format!("[\"{}\"]", args[0]);
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains(&format!("ENTRYPOINT {entrypoint}")),
        "Dockerfile entrypoint"
    );
    assert!(
        dockerfile.contains("scripts/image-rootfs.sh"),
        "Dockerfile: the shared layout"
    );
    let image = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image.sh")).unwrap();
    assert!(
        image.contains(&format!("--entrypoint '{entrypoint}'")),
        "scripts/image.sh entrypoint"
    );
    let base = dockerfile.lines().rfind(|l| l.starts_with("FROM ")).unwrap();
    assert_eq!(base, "FROM scratch", "final stage");
}

#[test]
fn local_example_parses_with_a_decrypt_only_key() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples/local.toml")).unwrap();
    let settings = Settings::from_toml(&text).unwrap_or_else(|e| panic!("deploy/examples/local.toml: {e}"));
    let BackendSettings::Local(local) = &settings.backend else {
        panic!("deploy/examples/local.toml: expected the local backend");
    };
    assert!(
        !local.decrypt_only_key_files.is_empty(),
        "local.toml shows a decrypt-only key"
    );
    assert!(!local.decrypt_only_key_files.contains(&local.current_key_file));
}

#[test]
fn yaml_reader_agrees_with_pyyaml() {
    const SCRIPT: &str = r#"
import sys, yaml
def flat(v, p, out):
    if isinstance(v, dict):
        if not v: out.append(p + "={}")
        for k, x in v.items(): flat(x, (p + "." if p else "") + str(k), out)
    elif isinstance(v, list):
        if not v: out.append(p + "=[]")
        for i, x in enumerate(v): flat(x, "%s[%d]" % (p, i), out)
    elif v is None: out.append(p + "=null")
    elif isinstance(v, bool): out.append(p + "=" + ("true" if v else "false"))
    else: out.append(p + "=" + str(v))
docs = list(yaml.safe_load_all(open(sys.argv[1])))
assert len(docs) == 1, "one document per file"
out = []
flat(docs[0], "", out)
print("\n".join(out))
"#;
    // The venv's interpreter, not the system python3: a check that silently skips when PyYAML
    // is absent would pass without testing anything.
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let probe = Command::new(&python).args(["-c", "import yaml"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{} cannot import PyYAML ({}); run integration/test.sh, or `{0} -m pip install pyyaml`",
            python.display(),
            // The traceback's last line: "ModuleNotFoundError: No module named 'yaml'".
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or_default()
        ),
        Err(e) => panic!(
            "cannot run {} ({e}); run integration/test.sh, which creates the venv with PyYAML",
            python.display()
        ),
    }
    for rel in YAML_FILES {
        let out = Command::new(&python)
            .args(["-c", SCRIPT])
            .arg(deploy_path(rel))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PyYAML on {rel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let mut ours = Vec::new();
        yaml(rel).flatten("", &mut ours);
        // A difference means a YAML 1.1 surprise (yes/no, 0660 as octal …) or a reader bug.
        assert_eq!(ours, theirs, "{rel}: this reader and PyYAML disagree");
    }
}

#[test]
fn yaml_reader_handles_its_subset() {
    let doc = parse_yaml(
        "inline",
        "a: 1 # c\nb:\n  - x\n  - k: v\n    l: 'q # not a comment'\nc:\n- y\nd: {}\ne: [p, \"q\"]\n",
    );
    let mut flat = Vec::new();
    doc.flatten("", &mut flat);
    assert_eq!(
        flat,
        [
            "a=1",
            "b[0]=x",
            "b[1].k=v",
            "b[1].l=q # not a comment",
            "c[0]=y",
            "d={}",
            "e[0]=p",
            "e[1]=q"
        ]
    );
    for bad in [
        "a: 1\na: 2\n",
        "a:\n\tb: 1\n",
        "a: |\n  text\n",
        "a: &x 1\n",
        "a: 1\n  b: 2\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_yaml("bad", bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}

/// A YAML value as this reader sees it: every scalar is a string.
#[derive(Debug, Clone, PartialEq)]
enum Yaml {
    Null,
    Str(String),
    Seq(Vec<Yaml>),
    Map(Vec<(String, Yaml)>),
}

impl Yaml {
    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn req(&self, key: &str) -> &Yaml {
        self.get(key)
            .unwrap_or_else(|| panic!("missing key {key:?} in {self:?}"))
    }

    fn str(&self) -> &str {
        match self {
            Yaml::Str(s) => s,
            other => panic!("expected a scalar, got {other:?}"),
        }
    }

    fn list(&self) -> &[Yaml] {
        match self {
            Yaml::Seq(items) => items,
            other => panic!("expected a list, got {other:?}"),
        }
    }

    /// `path=value` lines, the same shape the PyYAML script prints.
    fn flatten(&self, path: &str, out: &mut Vec<String>) {
        match self {
            Yaml::Null => out.push(format!("{path}=null")),
            Yaml::Str(s) => out.push(format!("{path}={s}")),
            Yaml::Seq(items) if items.is_empty() => out.push(format!("{path}=[]")),
            Yaml::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    item.flatten(&format!("{path}[{i}]"), out);
                }
            }
            Yaml::Map(entries) if entries.is_empty() => out.push(format!("{path}={{}}")),
            Yaml::Map(entries) => {
                for (k, v) in entries {
                    let sub = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    v.flatten(&sub, out);
                }
            }
        }
    }
}

struct Line {
    no: usize,
    indent: usize,
    text: String,
}

/// Reads one YAML document of block mappings, block sequences, plain or quoted scalars and
/// one-line flow collections. Panics, naming the line, on anything else.
fn parse_yaml(name: &str, src: &str) -> Yaml {
    let mut lines = Vec::new();
    for (i, raw) in src.lines().enumerate() {
        let text = strip_comment(raw).trim_end();
        if text.trim().is_empty() {
            continue;
        }
        assert!(!raw.contains('\t'), "{name}:{}: tab", i + 1);
        if text == "---" && lines.is_empty() {
            continue;
        }
        let body = text.trim_start();
        lines.push(Line {
            no: i + 1,
            indent: text.len() - body.len(),
            text: body.to_string(),
        });
    }
    let mut reader = Reader { name, lines, pos: 0 };
    let doc = reader.block(0);
    if let Some(line) = reader.lines.get(reader.pos) {
        panic!("{name}:{}: unexpected {:?}", line.no, line.text);
    }
    doc
}

struct Reader<'a> {
    name: &'a str,
    lines: Vec<Line>,
    pos: usize,
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

impl Reader<'_> {
    fn at(&self, indent: usize) -> Option<&Line> {
        self.lines.get(self.pos).filter(|l| l.indent == indent)
    }

    fn block(&mut self, indent: usize) -> Yaml {
        match self.at(indent) {
            Some(l) if is_item(&l.text) => self.seq(indent),
            Some(_) => self.map(indent),
            None => Yaml::Null,
        }
    }

    /// The value of a `key:` or `-` line with nothing after it: a deeper block, or a sequence at
    /// the key's own indentation, or null.
    fn nested(&mut self, indent: usize, same_indent_seq: bool) -> Yaml {
        match self.lines.get(self.pos) {
            Some(l) if l.indent > indent => {
                let deeper = l.indent;
                self.block(deeper)
            }
            Some(l) if same_indent_seq && l.indent == indent && is_item(&l.text) => self.seq(indent),
            _ => Yaml::Null,
        }
    }

    fn seq(&mut self, indent: usize) -> Yaml {
        let mut items = Vec::new();
        while let Some(line) = self.at(indent)
            && is_item(&line.text)
        {
            let (no, len) = (line.no, line.text.len());
            let rest = line.text[1..].trim_start().to_string();
            if rest.is_empty() {
                self.pos += 1;
                items.push(self.nested(indent, false));
            } else if split_key(&rest).is_some() {
                // `- key: value`: a mapping whose keys sit where `key` starts.
                let column = indent + len - rest.len();
                self.lines[self.pos].indent = column;
                self.lines[self.pos].text = rest;
                items.push(self.map(column));
            } else {
                self.pos += 1;
                items.push(scalar(self.name, no, &rest));
            }
        }
        Yaml::Seq(items)
    }

    fn map(&mut self, indent: usize) -> Yaml {
        let mut entries: Vec<(String, Yaml)> = Vec::new();
        while let Some(line) = self.at(indent)
            && !is_item(&line.text)
        {
            let no = line.no;
            let (key, rest) = split_key(&line.text)
                .map(|(k, r)| (k.to_string(), r.to_string()))
                .unwrap_or_else(|| panic!("{}:{no}: expected `key: value`, got {:?}", self.name, line.text));
            assert!(
                entries.iter().all(|(k, _)| *k != key),
                "{}:{no}: duplicate key {key:?}",
                self.name
            );
            self.pos += 1;
            let value = if rest.is_empty() {
                self.nested(indent, true)
            } else {
                scalar(self.name, no, &rest)
            };
            entries.push((key, value));
        }
        Yaml::Map(entries)
    }
}

/// `key: rest` or `key:`, for a plain key without spaces.
fn split_key(text: &str) -> Option<(&str, &str)> {
    let (key, rest) = match text.find(": ") {
        Some(i) => (&text[..i], text[i + 2..].trim()),
        None => (text.strip_suffix(':')?, ""),
    };
    let plain =
        !key.is_empty() && !key.contains(char::is_whitespace) && !key.starts_with(['"', '\'', '[', '{', '-', '#']);
    plain.then_some((key, rest))
}

fn scalar(name: &str, no: usize, text: &str) -> Yaml {
    let text = text.trim();
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .unwrap_or_else(|| panic!("{name}:{no}: unterminated ["));
        if inner.trim().is_empty() {
            return Yaml::Seq(Vec::new());
        }
        return Yaml::Seq(inner.split(',').map(|s| scalar(name, no, s)).collect());
    }
    if text == "{}" {
        return Yaml::Map(Vec::new());
    }
    if let Some(inner) = text.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .unwrap_or_else(|| panic!("{name}:{no}: unterminated string"));
        assert!(!inner.contains(['"', '\\']), "{name}:{no}: escapes are not supported");
        return Yaml::Str(inner.to_string());
    }
    if let Some(inner) = text.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .unwrap_or_else(|| panic!("{name}:{no}: unterminated string"));
        return Yaml::Str(inner.replace("''", "'"));
    }
    assert!(
        !text.starts_with(['|', '>', '&', '*', '!', '{', '%', '@', '`']),
        "{name}:{no}: {text:?} is outside the YAML subset this reader supports"
    );
    match text {
        "~" | "null" => Yaml::Null,
        _ => Yaml::Str(text.to_string()),
    }
}

/// Drops a `#` comment: at the start of the line or after a space, outside quoted scalars (a
/// quote opens one only where a scalar can start, so "node's" in a comment is not a quote).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') if matches!(prev, ' ' | '[' | ',' | '{') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev == ' ' => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

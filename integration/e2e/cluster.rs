//! A one-node control plane on loopback: Debian's etcd, the built plugin, and the kube-apiserver
//! binary named by `KMS_E2E_KUBE_APISERVER`, on free ports and temporary directories, with the
//! EncryptionConfiguration of `deploy/encryption-config.yaml`. Everything is killed on drop, so a
//! failed test leaves nothing running.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kms_plugin::inventory::etcd::pb::etcdserverpb::RangeRequest;
use kms_plugin::inventory::etcd::pb::etcdserverpb::kv_client::KvClient;
use kms_plugin::inventory::etcd::{self as etcd_client, prefix_end};
use kms_plugin::inventory::format::{self, Stored};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

use crate::common::Dir;
use crate::common::etcd::Etcd;

/// The provider name in `deploy/encryption-config.yaml`: part of every stored value's prefix.
pub const PROVIDER: &str = "kms-plugin";
/// What the deployed EncryptionConfiguration names as the socket; replaced by the test's.
const DEPLOYED_ENDPOINT: &str = "unix:///var/run/kmsplugin/kms.sock";
/// The namespace the scenarios write to (created by the apiserver itself at start).
pub const NAMESPACE: &str = "default";

/// The kube-apiserver binary under test, or a panic that says how to give one.
pub fn apiserver_binary() -> PathBuf {
    match std::env::var_os("KMS_E2E_KUBE_APISERVER") {
        Some(p) if Path::new(&p).is_file() => PathBuf::from(p),
        Some(p) => panic!("KMS_E2E_KUBE_APISERVER={} is not a file", Path::new(&p).display()),
        None => panic!(
            "the end-to-end suite needs a kube-apiserver binary (1.29 or newer): \
             KMS_E2E_KUBE_APISERVER=/path/to/kube-apiserver bash integration/e2e.sh (README, \"End-to-end tests\")"
        ),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` every 100 ms for at most `limit`; returns how long it took to hold.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

/// The EncryptionConfiguration an operator installs (deploy/), pointed at `socket`.
pub fn encryption_config(dir: &Dir, socket: &str) -> PathBuf {
    encryption_config_named(dir, socket, "encryption-config.yaml")
}

/// [`encryption_config`] written to `name` (one per node).
pub fn encryption_config_named(dir: &Dir, socket: &str, name: &str) -> PathBuf {
    let deployed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/encryption-config.yaml")).unwrap();
    assert!(
        deployed.contains(DEPLOYED_ENDPOINT),
        "deploy/encryption-config.yaml changed its endpoint"
    );
    assert!(
        deployed.contains(&format!("name: {PROVIDER} ")),
        "deploy/encryption-config.yaml changed its provider name"
    );
    let path = dir.path(name);
    std::fs::write(&path, deployed.replace(DEPLOYED_ENDPOINT, &format!("unix://{socket}"))).unwrap();
    path
}

/// A running kube-apiserver and a client logged in as a member of `system:masters`.
pub struct Apiserver {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    /// Logs in as a member of `system:masters` (for `migrate` and the controller-manager).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`: `migrate --apiserver` (an apiserver advertising a loopback
    /// address publishes no endpoints for `default/kubernetes`).
    pub url: String,
    pub client: Client,
}

impl Apiserver {
    /// Starts the apiserver on `etcd` with `encryption` and `extra` flags (e.g. feature gates)
    /// and waits until it is ready. Apiservers started in one `dir` (with distinct `node`
    /// names) share the serving certificate, service-account key and admin token, as the
    /// apiservers of one control plane do; each has its own log and kubeconfig.
    pub async fn start_with(dir: &Dir, etcd: &Etcd, encryption: &Path, extra: &[&str], node: &str) -> Apiserver {
        let port = free_port();
        let certs = dir.path("apiserver-certs");
        std::fs::create_dir_all(&certs).unwrap();
        // The service-account signing key (ECDSA P-256, PKCS#8) and its public half (the
        // apiserver reads only public keys from --service-account-key-file).
        let sa_key = dir.path("service-account.key");
        let sa_pub = dir.path("service-account.pub");
        let tokens = dir.path("tokens.csv");
        if !tokens.exists() {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
            std::fs::write(&sa_key, pem("PRIVATE KEY", pkcs8.as_ref())).unwrap();
            // SubjectPublicKeyInfo of a P-256 key: a fixed header, then the uncompressed point.
            let mut spki = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
            spki.extend_from_slice(pair.public_key().as_ref());
            std::fs::write(&sa_pub, pem("PUBLIC KEY", &spki)).unwrap();
            let token = crate::common::rand_hex(16);
            // And a user with no rights but those RBAC grants it (deploy/migrate-rbac.yaml).
            std::fs::write(
                &tokens,
                format!("{token},e2e-admin,e2e-admin,\"system:masters\"\n{token}m,e2e-migrate,e2e-migrate\n"),
            )
            .unwrap();
        }
        let token = std::fs::read_to_string(&tokens)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string();
        let mut args = vec![
            format!("--etcd-servers={}", etcd.endpoint),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--cert-dir={}", certs.display()),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--token-auth-file={}", tokens.display()),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            format!("--encryption-provider-config={}", encryption.display()),
            // Fewer background controllers on a 2-core machine.
            "--enable-priority-and-fairness=false".into(),
            "--v=2".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = dir.path(&format!("kube-apiserver{node}.log"));
        let kubeconfig = dir.path(&format!("kubeconfig{node}"));
        let mut apiserver = Apiserver {
            child: None,
            args,
            log,
            kubeconfig,
            url: format!("https://127.0.0.1:{port}"),
            // Replaced once the serving certificate exists.
            client: Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap(),
        };
        apiserver.spawn();
        // The apiserver writes its self-signed serving certificate (and CA) into --cert-dir
        // first thing; the client trusts exactly that.
        let crt = certs.join("apiserver.crt");
        wait_until("the apiserver's serving certificate", Duration::from_secs(60), || {
            let ok = crt.exists() && std::fs::read(&crt).map(|b| !b.is_empty()).unwrap_or(false);
            async move { ok }
        })
        .await;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\nusers:\n- name: e2e-admin\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: e2e-admin\n    namespace: {NAMESPACE}\ncurrent-context: e2e\n",
            crt.display()
        );
        std::fs::write(&apiserver.kubeconfig, kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&apiserver.kubeconfig).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        apiserver.client = Client::try_from(config).unwrap();
        apiserver.wait_ready().await;
        apiserver
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(apiserver_binary())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// The last lines of the apiserver's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// GET `path` on the apiserver: (HTTP status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let request = http::Request::get(path).body(Vec::new()).unwrap();
        match self.client.send(request.map(kube::client::Body::from)).await {
            Ok(response) => {
                let code = response.status().as_u16();
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                (code, body)
            }
            Err(e) => (0, e.to_string()),
        }
    }

    /// Whether `/readyz/kms-providers` answers 200 (the apiserver's view of every KMS v2 plugin).
    pub async fn kms_ready(&self) -> bool {
        self.get("/readyz/kms-providers").await.0 == 200
    }

    /// Waits (up to 3 minutes) until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) -> Duration {
        let start = Instant::now();
        loop {
            let (code, body) = self.get("/readyz").await;
            if code == 200 {
                return start.elapsed();
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait().unwrap()
            {
                panic!("kube-apiserver exited ({status}):\n{}", self.log_tail());
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "kube-apiserver not ready: {code} {body}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The key_id hashes the apiserver reports for this plugin's provider
    /// (`apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds`).
    pub async fn key_id_hashes(&self) -> Vec<String> {
        let (_, metrics) = self.get("/metrics").await;
        metrics
            .lines()
            .filter(|l| l.starts_with("apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{"))
            .filter(|l| l.contains(&format!("provider_name=\"{PROVIDER}\"")))
            .filter_map(|l| l.split("key_id_hash=\"").nth(1)?.split('"').next().map(str::to_string))
            .collect()
    }

    /// A kubeconfig for the user `e2e-migrate`, who has only what RBAC grants it.
    pub fn restricted_kubeconfig(&self) -> PathBuf {
        let admin = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let token = admin.split("token: ").nth(1).unwrap().lines().next().unwrap();
        let path = self.kubeconfig.with_extension("migrate");
        std::fs::write(
            &path,
            admin.replace(&format!("token: {token}"), &format!("token: {token}m")),
        )
        .unwrap();
        path
    }

    /// SIGTERM, then waits for the exit (bounded).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Stops and starts the apiserver with the same flags; returns the time until ready.
    pub async fn restart(&mut self) -> Duration {
        self.stop();
        let start = Instant::now();
        self.spawn();
        self.wait_ready().await;
        start.elapsed()
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `sha256:<hex>` of a key_id, as the apiserver's metrics label it.
pub fn key_id_hash(key_id: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, key_id.as_bytes());
    format!("sha256:{}", hex::encode(d.as_ref()))
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// Every value etcd holds under `prefix` (e.g. `/registry/secrets/default/`).
pub async fn etcd_values(etcd: &Etcd, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut kv = KvClient::new(etcd_client::channel(&etcd.connection()).await.unwrap());
    let response = kv
        .range(RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    response
        .kvs
        .into_iter()
        .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value))
        .collect()
}

/// The key_id a stored value was sealed under, or a panic naming what the value is instead.
pub fn stored_key_id(key: &str, value: &[u8]) -> String {
    match format::parse(value) {
        Stored::KmsV2 { provider, object } => {
            assert_eq!(provider, PROVIDER, "{key}");
            object.key_id
        }
        other => panic!("{key} is not a KMS v2 value of {PROVIDER}: {other:?}"),
    }
}

/// Creates `n` Secrets named `<prefix>-<i>` whose data is `marker-<i>`, at most 8 in flight.
pub async fn create_secrets(client: &Client, prefix: &str, marker: &str, n: usize) {
    let api: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let mut set: tokio::task::JoinSet<Result<(), kube::Error>> = tokio::task::JoinSet::new();
    for i in 0..n {
        if set.len() >= 8 {
            set.join_next().await.unwrap().unwrap().unwrap();
        }
        let api = api.clone();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(format!("{prefix}-{i}")),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "value".to_string(),
                ByteString(format!("{marker}-{i}").into_bytes()),
            )])),
            ..Default::default()
        };
        set.spawn(async move { api.create(&PostParams::default(), &secret).await.map(|_| ()) });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
}

/// Creates `n` ConfigMaps named `<prefix>-<i>` whose data is `marker-<i>`.
pub async fn create_config_maps(client: &Client, prefix: &str, marker: &str, n: usize) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    for i in 0..n {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("{prefix}-{i}")),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("value".to_string(), format!("{marker}-{i}"))])),
            ..Default::default()
        };
        api.create(&PostParams::default(), &cm).await.unwrap();
    }
}

/// Reads every Secret named `<prefix>-*` back through the apiserver and checks its data.
pub async fn check_secrets(client: &Client, prefix: &str, marker: &str, n: usize) {
    let api: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let mut seen = 0;
    for s in api.list(&ListParams::default()).await.unwrap() {
        let name = s.metadata.name.clone().unwrap();
        let Some(i) = name.strip_prefix(&format!("{prefix}-")) else {
            continue;
        };
        let value = s.data.unwrap()["value"].0.clone();
        assert_eq!(value, format!("{marker}-{i}").into_bytes(), "{name}");
        seen += 1;
    }
    assert_eq!(seen, n, "Secrets {prefix}-* read back");
}

/// Rewrites every Secret of every namespace unchanged (get, then update), as
/// `kubectl get secrets -A -o json | kubectl replace -f -` does: the apiserver re-seals each
/// under its current key.
pub async fn rewrite_secrets(client: &Client) -> usize {
    let list = Api::<Secret>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let n = list.items.len();
    for s in list {
        let namespace = s.metadata.namespace.clone().unwrap();
        let name = s.metadata.name.clone().unwrap();
        let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        api.replace(&name, &PostParams::default(), &s).await.unwrap();
    }
    n
}

/// Runs the built plugin binary with `args` (e.g. `inventory …`): (exit code, stdout).
pub fn plugin_command(args: &[&str]) -> (i32, String) {
    let out = Command::new(crate::common::BIN).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap_or(-1);
    if code == 1 {
        eprintln!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (code, stdout)
}

/// etcd, the plugin on `kind`'s backend, and the apiserver, started in that order. Fields drop
/// in order: the apiserver goes first, the temporary directory last.
pub struct Cluster {
    pub apiserver: Apiserver,
    pub plugin: Option<crate::common::Plugin>,
    pub keys: crate::servers::RootKeys,
    pub etcd: Etcd,
    pub dir: Dir,
}

impl Cluster {
    pub async fn start(kind: crate::servers::Kind) -> Cluster {
        Self::start_with(kind, &[]).await
    }

    /// As [`Cluster::start`], with more apiserver flags.
    pub async fn start_with(kind: crate::servers::Kind, apiserver_flags: &[&str]) -> Cluster {
        apiserver_binary();
        let dir = Dir::new();
        let etcd = Etcd::start(&dir).await;
        let keys = crate::servers::RootKeys::new(kind, &dir).await;
        let plugin = crate::common::Plugin::start_env(&keys.config, &keys.env).await;
        let encryption = encryption_config(&dir, &plugin.socket);
        let apiserver = Apiserver::start_with(&dir, &etcd, &encryption, apiserver_flags, "").await;
        Cluster {
            apiserver,
            plugin: Some(plugin),
            keys,
            etcd,
            dir,
        }
    }

    pub fn plugin(&self) -> &crate::common::Plugin {
        self.plugin.as_ref().expect("the plugin is running")
    }

    /// The plugin's current key_id (its Status).
    pub async fn key_id(&self) -> String {
        crate::common::status(&mut self.plugin().client().await).await.key_id
    }

    /// Waits (up to 60 s) until the plugin's Status names a key_id other than `old`.
    pub async fn wait_plugin_key_id_change(&self, old: &str) -> String {
        let mut c = self.plugin().client().await;
        let start = Instant::now();
        loop {
            let id = crate::common::status(&mut c).await.key_id;
            if id != old {
                return id;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the plugin never took the new key"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the plugin again on the same config (after a stop or a kill).
    pub async fn start_plugin(&mut self) {
        assert!(self.plugin.is_none());
        self.plugin = Some(crate::common::Plugin::start_env(&self.keys.config, &self.keys.env).await);
    }

    /// `kms-plugin migrate` against this cluster (its kubeconfig, EncryptionConfiguration and
    /// etcd) with `args`: (exit code, stdout).
    pub fn migrate(&self, args: &[&str]) -> (i32, String) {
        plugin_command(&self.migrate_args(args).iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// The full argument list of [`Cluster::migrate`].
    pub fn migrate_args(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec![
            "migrate".to_string(),
            format!("--kubeconfig={}", self.apiserver.kubeconfig.display()),
            format!(
                "--encryption-config={}",
                self.dir.path("encryption-config.yaml").display()
            ),
            format!("--apiserver={}", self.apiserver.url),
        ];
        all.extend(self.etcd.args());
        all.extend(args.iter().map(|a| a.to_string()));
        all
    }

    /// `kms-plugin inventory` against this cluster's etcd with `args`: (exit code, stdout).
    pub fn inventory(&self, args: &[&str]) -> (i32, String) {
        let mut all = vec!["inventory".to_string()];
        all.extend(self.etcd.args());
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        plugin_command(&all)
    }

    /// `inventory --require-retirable key_id`, the provider read from the cluster's
    /// EncryptionConfiguration as an operator gives it: (exit code, stdout).
    pub fn retirable(&self, key_id: &str) -> (i32, String) {
        let config = self.dir.path("encryption-config.yaml").display().to_string();
        self.inventory(&["--encryption-config", &config, "--require-retirable", key_id])
    }

    /// Waits until the apiserver reports `key_id`'s hash for the provider; returns how long.
    pub async fn wait_apiserver_key_id(&self, key_id: &str, limit: Duration) -> Duration {
        let want = key_id_hash(key_id);
        wait_until(&format!("the apiserver to report {want}"), limit, || async {
            self.apiserver.key_id_hashes().await.contains(&want)
        })
        .await
    }

    /// Creates Secrets `<prefix>-<i>` one a second until one is stored under `key_id`; returns
    /// how many were written before.
    pub async fn wait_secret_stored_under(&self, key_id: &str, prefix: &str, limit: Duration) -> usize {
        let api: Api<Secret> = Api::namespaced(self.apiserver.client.clone(), NAMESPACE);
        let start = Instant::now();
        for i in 0.. {
            let name = format!("{prefix}-{i}");
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([("value".to_string(), "x".to_string())])),
                ..Default::default()
            };
            api.create(&PostParams::default(), &secret).await.unwrap();
            let key = format!("/registry/secrets/{NAMESPACE}/{name}");
            let values = etcd_values(&self.etcd, &key).await;
            if stored_key_id(&key, &values[&key]) == key_id {
                return i;
            }
            assert!(
                start.elapsed() < limit,
                "no Secret stored under the new key_id after {limit:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        unreachable!()
    }
}

/// kube-controller-manager (`KMS_E2E_KUBE_CONTROLLER_MANAGER`, or the one beside the
/// kube-apiserver binary) with `flags`, logged in through `apiserver`'s kubeconfig.
pub struct ControllerManager {
    child: Child,
}

impl ControllerManager {
    pub fn start(dir: &Dir, apiserver: &Apiserver, flags: &[&str]) -> ControllerManager {
        let binary = match std::env::var_os("KMS_E2E_KUBE_CONTROLLER_MANAGER") {
            Some(p) => PathBuf::from(p),
            None => apiserver_binary().with_file_name("kube-controller-manager"),
        };
        assert!(
            binary.is_file(),
            "this test needs kube-controller-manager: put it beside kube-apiserver or set KMS_E2E_KUBE_CONTROLLER_MANAGER (not {})",
            binary.display()
        );
        let log = std::fs::File::create(dir.path("kube-controller-manager.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--kubeconfig={}", apiserver.kubeconfig.display()))
            .args(["--leader-elect=false", "--secure-port=0", "--v=2"])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        ControllerManager { child }
    }
}

impl Drop for ControllerManager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line the suite's log readers (and docs/operations.md's table) pick up.
pub fn measured(what: &str, took: Duration) {
    eprintln!("E2E-MEASURE {what}: {:.1} s", took.as_secs_f64());
}

//! The Azure Key Vault emulation (integration/emulators/azure_keyvault.py: Python's standard
//! library and `cryptography`, installed by integration/deps.sh into .venv) on 127.0.0.1,
//! started per test on a free port, over HTTPS with its own CA. The plugin reaches the vault as
//! `kv.vault.azure.net:<port>` (its `vault_ip` setting maps the name to 127.0.0.1), Entra ID's
//! token endpoint as `https://127.0.0.1:<port>`, and the managed-identity endpoint through
//! `IDENTITY_ENDPOINT`. Its state is a file, so it can be stopped and started with its keys, and
//! administered (new key version, disable, deny) by its `admin` subcommand.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Dir;

pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";

fn python() -> String {
    std::env::var("KMS_TEST_PYTHON").unwrap_or_else(|_| {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
        if Path::new(local).exists() {
            local.to_string()
        } else {
            "python3".to_string()
        }
    })
}

fn emulator() -> String {
    std::env::var("KMS_TEST_AZURE_EMULATOR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/integration/emulators/azure_keyvault.py").to_string())
}

/// How the plugin authenticates in a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    ClientSecret,
    ClientCertificate,
    /// Through AKS's environment (AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_FEDERATED_TOKEN_FILE).
    WorkloadIdentity,
    /// Through IDENTITY_ENDPOINT and IDENTITY_HEADER.
    ManagedIdentity,
}

pub struct KeyVault {
    child: Option<Child>,
    /// The emulator's directory: state, CA, credentials, issued tokens.
    pub dir: PathBuf,
    pub port: u16,
    hsm: bool,
}

impl KeyVault {
    /// A vault with key `k` (one RSA version), serving.
    pub fn start(dir: &Dir) -> KeyVault {
        Self::start_with(dir, false)
    }

    /// With `hsm`, a Managed HSM whose key `k` is a 256-bit oct-HSM key (A256KW).
    pub fn start_with(dir: &Dir, hsm: bool) -> KeyVault {
        let path = dir.path(if hsm { "managed-hsm" } else { "key-vault" });
        let mut init = Command::new(python());
        init.args([&emulator(), "init", "--dir", path.to_str().unwrap()]);
        if hsm {
            init.arg("--hsm");
        }
        let out = init.output().expect("run the Azure emulator");
        assert!(
            out.status.success(),
            "emulator init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut kv = KeyVault {
            child: None,
            dir: path,
            port,
            hsm,
        };
        kv.run();
        kv
    }

    /// Starts the server (again) on its port and waits until it accepts connections.
    pub fn run(&mut self) {
        let child = Command::new(python())
            .args([
                &emulator(),
                "serve",
                "--dir",
                self.dir.to_str().unwrap(),
                "--port",
                &self.port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Azure emulator");
        self.child = Some(child);
        let began = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                began.elapsed() < Duration::from_secs(20),
                "the Azure emulator did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server; its state stays on disk.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (SIGSTOP) or resumes (SIGCONT) the server: connections are accepted by the
    /// kernel and never answered, as with a hung service.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().expect("running").id();
        let sig = if paused { "-STOP" } else { "-CONT" };
        assert!(
            Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Runs an admin command (`rotate`, `disable`, `enable`, `deny`, `allow`, `counters`,
    /// `unwrap KID B64`) and returns its output.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = Command::new(python())
            .args([&emulator(), "admin", "--dir", self.dir.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "emulator admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The wrap, unwrap and get calls the vault answered so far.
    pub fn counter(&self, op: &str) -> u64 {
        let counters: serde_json::Value = serde_json::from_str(&self.admin(&["counters"])).unwrap();
        counters[op].as_u64().unwrap()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn vault_url(&self) -> String {
        let host = if self.hsm {
            "kv.managedhsm.azure.net"
        } else {
            "kv.vault.azure.net"
        };
        format!("https://{host}:{}", self.port)
    }

    pub fn authority(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The `[backend.auth]` table for `auth`.
    pub fn auth_table(&self, auth: Auth) -> String {
        let file = |n: &str| format!("{:?}", self.file(n).display().to_string());
        match auth {
            Auth::ClientSecret => format!(
                "method = \"client_secret\"\ntenant_id = {TENANT:?}\nclient_id = {CLIENT_ID:?}\nclient_secret_file = {}\nauthority_host = {:?}\n",
                file("client-secret"),
                self.authority()
            ),
            Auth::ClientCertificate => format!(
                "method = \"client_certificate\"\ntenant_id = {TENANT:?}\nclient_id = {CLIENT_ID:?}\ncertificate_file = {}\ncertificate_key_file = {}\nauthority_host = {:?}\n",
                file("client.pem"),
                file("client.key"),
                self.authority()
            ),
            Auth::WorkloadIdentity => "method = \"workload_identity\"\n".into(),
            Auth::ManagedIdentity => "method = \"managed_identity\"\n".into(),
        }
    }

    /// The environment `auth` takes its settings from.
    pub fn env(&self, auth: Auth) -> Vec<(&'static str, String)> {
        match auth {
            Auth::ClientSecret | Auth::ClientCertificate => Vec::new(),
            Auth::WorkloadIdentity => vec![
                ("AZURE_TENANT_ID", TENANT.into()),
                ("AZURE_CLIENT_ID", CLIENT_ID.into()),
                (
                    "AZURE_FEDERATED_TOKEN_FILE",
                    self.file("federated-token").display().to_string(),
                ),
                ("AZURE_AUTHORITY_HOST", self.authority()),
            ],
            Auth::ManagedIdentity => vec![
                ("IDENTITY_ENDPOINT", format!("{}/msi/token", self.authority())),
                (
                    "IDENTITY_HEADER",
                    std::fs::read_to_string(self.file("identity-header")).unwrap(),
                ),
            ],
        }
    }

    /// A plugin config for this vault's key `k`, authenticating with `auth`.
    pub fn config(&self, dir: &Dir, auth: Auth, extra: &str) -> PathBuf {
        self.config_keys(dir, auth, "k", &[], extra)
    }

    /// A plugin config with `key` current and `old` decrypt-only.
    pub fn config_keys(&self, dir: &Dir, auth: Auth, key: &str, old: &[&str], extra: &str) -> PathBuf {
        let algorithm = if self.hsm { "A256KW" } else { "RSA-OAEP-256" };
        dir.write_config(&format!(
            "{extra}\n[socket]\npath = {:?}\n[backend]\ntype = \"azure\"\nvault_url = {:?}\nvault_ip = \"127.0.0.1\"\nkey = {key:?}\ndecrypt_only_keys = {old:?}\nalgorithm = {algorithm:?}\nca_file = {:?}\ncall_timeout = \"1500ms\"\nattempt_timeout = \"500ms\"\n[backend.auth]\n{}",
            dir.socket(),
            self.vault_url(),
            self.file("ca.pem").display().to_string(),
            self.auth_table(auth),
        ))
    }

    /// Everything the logs must never show: the credentials and every token issued.
    pub fn secrets(&self) -> Vec<Vec<u8>> {
        let read = |n: &str| std::fs::read(self.file(n)).unwrap();
        let mut out = vec![
            String::from_utf8(read("client-secret"))
                .unwrap()
                .trim()
                .as_bytes()
                .to_vec(),
            read("client.key"),
            read("federated-token"),
            read("identity-header"),
        ];
        if let Ok(tokens) = std::fs::read_to_string(self.file("tokens.txt")) {
            out.extend(tokens.lines().map(|t| t.as_bytes().to_vec()));
        }
        out
    }

    /// The KEK inside a wrapped blob, unwrapped the way the vault's administrator could.
    pub fn unwrap(&self, key_id: &str, blob: &[u8]) -> Vec<u8> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let out = self.admin(&["unwrap", key_id, &b64.encode(blob)]);
        b64.decode(out.trim()).unwrap()
    }
}

impl Drop for KeyVault {
    fn drop(&mut self) {
        self.stop();
    }
}

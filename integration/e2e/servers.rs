//! The root key of each backend that has a real server in the tests, and how an operator rotates
//! it without restarting the plugin: a live config reload (local, PKCS#11) or a new key at the
//! key manager that the plugin's probe notices (OpenBao Transit, PyKMIP, moto, and the Cloud KMS
//! and Key Vault emulations: a new key version).

use std::path::PathBuf;
use std::time::Duration;

use crate::common::Dir;
use crate::common::kmip::Kmip;
use crate::common::moto::Moto;
use crate::common::openbao::Bao;
use crate::common::softhsm::SoftHsm;

/// Sections every e2e plugin config starts with: a quick probe and reload so the suite's wall
/// time is spent on the apiserver's own 1-minute Status poll, not on ours.
const EXTRA: &str = "[probe]\ninterval = \"2s\"\n[reload]\ninterval = \"1s\"\n";

/// Which backend a cluster's plugin runs on.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Local,
    Pkcs11,
    Vault,
    Kmip,
    Aws,
    #[cfg(feature = "gcp")]
    Gcp,
    #[cfg(feature = "azure")]
    Azure,
}

enum Server {
    Local,
    Pkcs11(SoftHsm),
    Vault(Bao, String),
    Kmip(Kmip),
    Aws(Moto, Vec<String>),
    #[cfg(feature = "gcp")]
    Gcp(crate::common::gcp::GcpKms, String),
    #[cfg(feature = "azure")]
    Azure(crate::common::azure::KeyVault),
}

/// A backend's server (if any), its current root key, and the plugin's config file.
pub struct RootKeys {
    server: Server,
    /// The config `serve` runs with; rotations rewrite it in place (a new inode).
    pub config: PathBuf,
    /// Environment the plugin needs (SoftHSM2's config, moto's fake credentials).
    pub env: Vec<(&'static str, String)>,
    generation: usize,
}

impl RootKeys {
    /// Starts `kind`'s server with a first root key and writes the plugin's config.
    pub async fn new(kind: Kind, dir: &Dir) -> RootKeys {
        let (server, env) = match kind {
            Kind::Local => (Server::Local, Vec::new()),
            Kind::Pkcs11 => {
                let hsm = SoftHsm::new(dir);
                hsm.keygen("root-0");
                let env = hsm.env();
                (Server::Pkcs11(hsm), env)
            }
            Kind::Vault => {
                let bao = Bao::dev(dir);
                bao.cli(&["write", "-f", "transit/keys/k"]);
                bao.plugin_policy("kms", "k");
                let auth = bao.token_auth(dir, &bao.token("kms", "1h"));
                (Server::Vault(bao, auth), Vec::new())
            }
            Kind::Kmip => {
                let kmip = Kmip::start(dir);
                kmip.create_key("kms-root");
                (Server::Kmip(kmip), Vec::new())
            }
            Kind::Aws => {
                let moto = Moto::start().await;
                let key = moto.create_key().await;
                moto.alias("alias/kms-plugin", &key).await;
                (Server::Aws(moto, vec![key]), Moto::env())
            }
            #[cfg(feature = "gcp")]
            Kind::Gcp => {
                let kms = crate::common::gcp::GcpKms::start(dir).await;
                let key = kms.create_key("root");
                let env = kms.env();
                (Server::Gcp(kms, key), env)
            }
            #[cfg(feature = "azure")]
            Kind::Azure => {
                let kv = crate::common::azure::KeyVault::start(dir);
                let env = kv.env(crate::common::azure::Auth::ClientSecret);
                (Server::Azure(kv), env)
            }
        };
        let keys = RootKeys {
            server,
            config: dir.path("plugin.toml"),
            env,
            generation: 0,
        };
        keys.write_config(dir);
        keys
    }

    /// Makes a new root key current, as an operator does, without touching the plugin process.
    pub async fn rotate(&mut self, dir: &Dir) {
        self.generation += 1;
        match &mut self.server {
            Server::Local => {}
            Server::Pkcs11(hsm) => hsm.keygen(&format!("root-{}", self.generation)),
            Server::Vault(bao, _) => {
                bao.cli(&["write", "-f", "transit/keys/k/rotate"]);
            }
            Server::Kmip(kmip) => {
                // Initial Date has a resolution of one second: the new key must be newer.
                tokio::time::sleep(Duration::from_millis(1100)).await;
                kmip.create_key("kms-root");
            }
            Server::Aws(moto, keys) => {
                let key = moto.create_key().await;
                moto.alias("alias/kms-plugin", &key).await;
                keys.push(key);
            }
            #[cfg(feature = "gcp")]
            Server::Gcp(kms, key) => {
                kms.rotate(key);
            }
            #[cfg(feature = "azure")]
            Server::Azure(kv) => {
                kv.admin(&["rotate"]);
            }
        }
        self.write_config(dir);
    }

    /// (Re)writes the config for the current generation: the newest key current, the older
    /// ones decrypt-only (for the backends whose config names them).
    fn write_config(&self, dir: &Dir) {
        let names = |prefix: &str| -> Vec<String> { (0..self.generation).map(|g| format!("{prefix}{g}")).collect() };
        let current = format!("root-{}", self.generation);
        let old = names("root-");
        let old: Vec<&str> = old.iter().map(String::as_str).collect();
        let written = match &self.server {
            Server::Local => {
                let old: Vec<String> = old
                    .iter()
                    .map(|k| format!("{:?}", dir.key(k).display().to_string()))
                    .collect();
                dir.write_config(&format!(
                    "{EXTRA}\n[socket]\npath = {:?}\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\ndecrypt_only_key_files = [{}]\n",
                    dir.socket(),
                    dir.key(&current).display().to_string(),
                    old.join(", ")
                ))
            }
            Server::Pkcs11(hsm) => hsm.config(dir, &current, &old, &hsm.pin_file, EXTRA),
            Server::Vault(bao, auth) => bao.config(dir, "k", &[], auth, "", EXTRA),
            Server::Kmip(kmip) => kmip.config(dir, "kms-root", "", EXTRA),
            Server::Aws(moto, keys) => {
                let old: Vec<&str> = keys[..keys.len() - 1].iter().map(String::as_str).collect();
                moto.config(dir, "alias/kms-plugin", &old, EXTRA)
            }
            #[cfg(feature = "gcp")]
            Server::Gcp(kms, key) => dir.write_config(&kms.config(dir, key, &[], &kms.service_account_line(), EXTRA)),
            #[cfg(feature = "azure")]
            Server::Azure(kv) => kv.config(dir, crate::common::azure::Auth::ClientSecret, EXTRA),
        };
        // Same path, new inode: what editors and a ConfigMap's symlink swap do.
        std::fs::rename(written, &self.config).unwrap();
    }
}

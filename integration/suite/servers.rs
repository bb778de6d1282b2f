//! The real root-key servers, one [`RootKeyServer`] impl each, over the process harnesses in
//! `integration/common/`.

use std::path::PathBuf;
use std::time::Duration;

use tonic::Code;

#[cfg(feature = "azure")]
use super::DenyingServer;
use super::{Pickup, Recovery, RemoteServer, RootKeyServer};
use kms_plugin::contract::KEK_ANNOTATION;
use kms_plugin::proto::v2::EncryptResponse;

#[cfg(feature = "azure")]
use crate::common::azure;
use crate::common::{Dir, kmip, moto, openbao, rand_hex, softhsm};

/// Local root-key files `root-1`, `root-2` … in the case's directory; the last is current.
pub struct Local {
    keys: Vec<String>,
}

impl RootKeyServer for Local {
    async fn start(dir: &Dir) -> Self {
        dir.key("root-1");
        Local {
            keys: vec!["root-1".into()],
        }
    }

    fn config(&self, dir: &Dir, extra: &str) -> String {
        let (current, old) = self.keys.split_last().unwrap();
        let old: Vec<&str> = old.iter().map(String::as_str).collect();
        std::fs::read_to_string(dir.config(&dir.socket(), current, &old, extra)).unwrap()
    }

    async fn rotate(&mut self, dir: &Dir) -> Pickup {
        let name = format!("root-{}", self.keys.len() + 1);
        dir.key(&name);
        self.keys.push(name);
        Pickup::Reload
    }

    fn secrets(&self, dir: &Dir) -> Vec<Vec<u8>> {
        self.keys.iter().map(|k| std::fs::read(dir.key(k)).unwrap()).collect()
    }

    async fn kek(&self, dir: &Dir, e: &EncryptResponse) -> Option<Vec<u8>> {
        use kms_plugin::backend::Backend;
        let paths: Vec<_> = self.keys.iter().map(|k| dir.key(k)).collect();
        let local = kms_plugin::backend::local::LocalBackend::open(&paths[0], &paths[1..]).unwrap();
        let kek = local.unwrap(&e.key_id, &e.annotations[KEK_ANNOTATION]).await.unwrap();
        Some(kek.expose().to_vec())
    }
}

/// A SoftHSM2 token with keys labelled `root-1`, `root-2` …; the last is current. The plugin
/// reaches it through a module that can unplug it (`common/pkcs11_unplug.c`).
pub struct Pkcs11 {
    hsm: softhsm::SoftHsm,
    module: PathBuf,
    module_env: Vec<(&'static str, String)>,
    unplugged: PathBuf,
    /// Labels of the keys still on the token.
    labels: Vec<String>,
    made: usize,
}

impl Pkcs11 {
    fn keygen(&mut self) {
        self.made += 1;
        let label = format!("root-{}", self.made);
        self.hsm.keygen(&label);
        self.labels.push(label);
    }
}

impl RootKeyServer for Pkcs11 {
    async fn start(dir: &Dir) -> Self {
        let unplugged = dir.path("token-unplugged");
        let (module, module_env) = softhsm::unpluggable(dir, &unplugged);
        let mut s = Pkcs11 {
            hsm: softhsm::SoftHsm::new(dir),
            module,
            module_env,
            unplugged,
            labels: Vec::new(),
            made: 0,
        };
        s.keygen();
        s
    }

    fn config(&self, dir: &Dir, extra: &str) -> String {
        let (current, old) = self.labels.split_last().unwrap();
        let old: Vec<&str> = old.iter().map(String::as_str).collect();
        let text = std::fs::read_to_string(self.hsm.config(dir, current, &old, &self.hsm.pin_file, extra)).unwrap();
        let module = format!("{:?}", self.module.display().to_string());
        text.replace(&format!("{:?}", softhsm::MODULE), &module)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.hsm.env();
        env.extend(self.module_env.iter().cloned());
        env
    }

    async fn rotate(&mut self, _: &Dir) -> Pickup {
        self.keygen();
        Pickup::Reload
    }

    fn secrets(&self, _: &Dir) -> Vec<Vec<u8>> {
        vec![softhsm::PIN.as_bytes().to_vec()]
    }
}

impl RemoteServer for Pkcs11 {
    const REVOKED: Code = Code::FailedPrecondition;

    /// Deletes the current key from the token.
    async fn revoke(&mut self, _: &Dir) {
        let label = self.labels.pop().unwrap();
        self.hsm.delete(&label);
    }

    /// A new key under a new label, named in the config.
    async fn recover(&mut self, _: &Dir) -> Recovery {
        self.keygen();
        Recovery::NewKey(Pickup::Reload)
    }

    /// Unplugs the token: every call answers CKR_DEVICE_REMOVED.
    async fn stop(&mut self) {
        std::fs::write(&self.unplugged, "").unwrap();
    }

    async fn restart(&mut self) {
        std::fs::remove_file(&self.unplugged).unwrap();
    }
}

/// moto's KMS server; `alias/kms-plugin` names the current key.
pub struct Aws {
    moto: moto::Moto,
    /// ARNs, the last current.
    keys: Vec<String>,
    secret_key: String,
    session_token: String,
}

const ALIAS: &str = "alias/kms-plugin";

impl RootKeyServer for Aws {
    async fn start(_: &Dir) -> Self {
        let moto = moto::Moto::start().await;
        let key = moto.create_key().await;
        moto.alias(ALIAS, &key).await;
        Aws {
            moto,
            keys: vec![key],
            // moto checks no signature: these only have to be long enough to search for.
            secret_key: format!("test-secret-key-{}", rand_hex(12)),
            session_token: format!("test-session-token-{}", rand_hex(24)),
        }
    }

    fn config(&self, dir: &Dir, extra: &str) -> String {
        let old: Vec<&str> = self.keys[..self.keys.len() - 1].iter().map(String::as_str).collect();
        std::fs::read_to_string(self.moto.config(dir, ALIAS, &old, extra)).unwrap()
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_SESSION_TOKEN", self.session_token.clone()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// Re-points the alias to a new key.
    async fn rotate(&mut self, _: &Dir) -> Pickup {
        let key = self.moto.create_key().await;
        self.moto.alias(ALIAS, &key).await;
        self.keys.push(key);
        Pickup::Live
    }

    fn secrets(&self, _: &Dir) -> Vec<Vec<u8>> {
        vec![
            self.secret_key.as_bytes().to_vec(),
            self.session_token.as_bytes().to_vec(),
        ]
    }

    async fn kek(&self, _: &Dir, e: &EncryptResponse) -> Option<Vec<u8>> {
        let out = (self.moto.client.decrypt())
            .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(
                e.annotations[KEK_ANNOTATION].to_vec(),
            ))
            .encryption_context("kms-plugin", "local-kek")
            .send()
            .await
            .unwrap();
        Some(out.plaintext.unwrap().into_inner())
    }
}

impl RemoteServer for Aws {
    const REVOKED: Code = Code::FailedPrecondition;

    async fn revoke(&mut self, _: &Dir) {
        self.moto.set_enabled(self.keys.last().unwrap(), false).await;
    }

    async fn recover(&mut self, _: &Dir) -> Recovery {
        self.moto.set_enabled(self.keys.last().unwrap(), true).await;
        Recovery::SameKey
    }

    /// SIGSTOP: calls hang until the plugin's timeouts, as with a dead network.
    async fn stop(&mut self) {
        self.moto.pause(true);
    }

    async fn restart(&mut self) {
        self.moto.pause(false);
    }
}

/// OpenBao over TLS with storage on disk (so it can be stopped and started), Transit key `k`,
/// the least-privilege policy `kms` and a token for it.
pub struct Vault {
    bao: openbao::Bao,
    auth: String,
    token: String,
}

impl RootKeyServer for Vault {
    async fn start(dir: &Dir) -> Self {
        let bao = openbao::Bao::tls(dir);
        bao.cli(&["write", "-f", "transit/keys/k"]);
        bao.plugin_policy("kms", "k");
        let token = bao.token("kms", "24h");
        let auth = bao.token_auth(dir, &token);
        Vault { bao, auth, token }
    }

    fn config(&self, dir: &Dir, extra: &str) -> String {
        std::fs::read_to_string(self.bao.config(dir, "k", &[], &self.auth, "", extra)).unwrap()
    }

    /// A new Transit key version.
    async fn rotate(&mut self, _: &Dir) -> Pickup {
        self.bao.cli(&["write", "-f", "transit/keys/k/rotate"]);
        Pickup::Live
    }

    fn secrets(&self, _: &Dir) -> Vec<Vec<u8>> {
        vec![self.token.as_bytes().to_vec()]
    }

    /// Transit decrypt as root, with the key_id as associated data as the plugin binds it.
    async fn kek(&self, _: &Dir, e: &EncryptResponse) -> Option<Vec<u8>> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let blob = String::from_utf8(e.annotations[KEK_ANNOTATION].to_vec()).unwrap();
        let kek = self.bao.cli(&[
            "write",
            "-field=plaintext",
            "transit/decrypt/k",
            &format!("ciphertext={blob}"),
            &format!("associated_data={}", b64.encode(e.key_id.as_bytes())),
        ]);
        Some(b64.decode(kek.trim()).unwrap())
    }
}

impl RemoteServer for Vault {
    const REVOKED: Code = Code::PermissionDenied;

    /// Deletes the plugin's policy: every call is denied.
    async fn revoke(&mut self, _: &Dir) {
        self.bao.cli(&["policy", "delete", "kms"]);
    }

    async fn recover(&mut self, _: &Dir) -> Recovery {
        self.bao.plugin_policy("kms", "k");
        Recovery::SameKey
    }

    async fn stop(&mut self) {
        self.bao.stop();
    }

    /// Starts the process again and unseals it, as an operator would.
    async fn restart(&mut self) {
        self.bao.start();
        self.bao.unseal();
    }
}

/// pykmip-server with AES keys named `kms-root`; the newest is current.
pub struct Kmip {
    kmip: kmip::Kmip,
    /// Unique Identifiers, the last current.
    uids: Vec<String>,
}

impl Kmip {
    /// A new key under the name. Initial Date has a resolution of one second: the new key must
    /// be strictly newer to be the current one.
    fn new_key(&mut self) {
        std::thread::sleep(Duration::from_millis(1100));
        let uid = self.kmip.create_key("kms-root");
        self.uids.push(uid);
    }
}

impl RootKeyServer for Kmip {
    const TAMPERED: &'static [Code] = &[Code::DataLoss, Code::Unavailable];

    async fn start(dir: &Dir) -> Self {
        let kmip = kmip::Kmip::start(dir);
        let uid = kmip.create_key("kms-root");
        Kmip { kmip, uids: vec![uid] }
    }

    fn config(&self, dir: &Dir, extra: &str) -> String {
        let old: Vec<String> = self.uids[..self.uids.len() - 1]
            .iter()
            .map(|u| format!("{u:?}"))
            .collect();
        let backend = format!("decrypt_only_keys = [{}]", old.join(", "));
        std::fs::read_to_string(self.kmip.config(dir, "kms-root", &backend, extra)).unwrap()
    }

    async fn rotate(&mut self, _: &Dir) -> Pickup {
        self.new_key();
        Pickup::Live
    }

    fn secrets(&self, _: &Dir) -> Vec<Vec<u8>> {
        vec![std::fs::read(&self.kmip.pki.client_key).unwrap()]
    }
}

impl RemoteServer for Kmip {
    const REVOKED: Code = Code::FailedPrecondition;

    async fn revoke(&mut self, _: &Dir) {
        self.kmip.revoke(self.uids.last().unwrap());
    }

    /// A revoked KMIP key stays revoked: a new key under the name takes over.
    async fn recover(&mut self, _: &Dir) -> Recovery {
        self.new_key();
        Recovery::NewKey(Pickup::Live)
    }

    async fn stop(&mut self) {
        self.kmip.stop();
    }

    async fn restart(&mut self) {
        self.kmip.run();
    }
}

/// The Cloud KMS emulation; the current key's primary version wraps, a rotation makes a new
/// primary version (noticed by the probe), revocation disables the primary.
#[cfg(feature = "gcp")]
pub struct Gcp {
    kms: crate::common::gcp::GcpKms,
    key: String,
    /// Versions of `key`, the last primary.
    versions: Vec<String>,
}

#[cfg(feature = "gcp")]
impl RootKeyServer for Gcp {
    async fn start(dir: &Dir) -> Self {
        let kms = crate::common::gcp::GcpKms::start(dir).await;
        let key = kms.create_key("root");
        let versions = vec![format!("{key}/cryptoKeyVersions/1")];
        Gcp { kms, key, versions }
    }

    fn config(&self, dir: &Dir, extra: &str) -> String {
        self.kms
            .config(dir, &self.key, &[], &self.kms.service_account_line(), extra)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        self.kms.env()
    }

    async fn rotate(&mut self, _: &Dir) -> Pickup {
        self.versions.push(self.kms.rotate(&self.key));
        Pickup::Live
    }

    fn secrets(&self, _: &Dir) -> Vec<Vec<u8>> {
        let account: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.kms.service_account()).unwrap()).unwrap();
        let pem = account["private_key"].as_str().unwrap();
        let mut out: Vec<Vec<u8>> = pem
            .lines()
            .filter(|l| l.len() >= 32)
            .map(|l| l.as_bytes().to_vec())
            .collect();
        out.extend(self.kms.tokens().into_iter().map(String::into_bytes));
        out
    }

    async fn kek(&self, _: &Dir, e: &EncryptResponse) -> Option<Vec<u8>> {
        Some(self.kms.unwrap(&e.key_id, &e.annotations[KEK_ANNOTATION]))
    }
}

#[cfg(feature = "gcp")]
impl RemoteServer for Gcp {
    const REVOKED: Code = Code::FailedPrecondition;

    async fn revoke(&mut self, _: &Dir) {
        self.kms.set_state(self.versions.last().unwrap(), "DISABLED");
    }

    async fn recover(&mut self, _: &Dir) -> Recovery {
        self.kms.set_state(self.versions.last().unwrap(), "ENABLED");
        Recovery::SameKey
    }

    async fn stop(&mut self) {
        self.kms.stop();
    }

    async fn restart(&mut self) {
        self.kms.restart().await;
    }
}

#[cfg(feature = "gcp")]
impl super::DenyingServer for Gcp {
    async fn deny(&mut self, _: &Dir) {
        self.kms.deny(true);
    }

    async fn allow(&mut self, _: &Dir) {
        self.kms.deny(false);
    }
}

/// The Azure Key Vault emulation (integration/emulators/azure_keyvault.py) with key `k`; its
/// newest version is current. The plugin signs in with a client secret (the other credential
/// sources are tested in integration/azure.rs).
#[cfg(feature = "azure")]
pub struct Azure {
    kv: azure::KeyVault,
}

#[cfg(feature = "azure")]
impl RootKeyServer for Azure {
    async fn start(dir: &Dir) -> Self {
        Azure {
            kv: azure::KeyVault::start(dir),
        }
    }

    fn config(&self, dir: &Dir, extra: &str) -> String {
        std::fs::read_to_string(self.kv.config(dir, azure::Auth::ClientSecret, extra)).unwrap()
    }

    /// A new key version, as a manual rotation or the vault's rotation policy makes.
    async fn rotate(&mut self, _: &Dir) -> Pickup {
        self.kv.admin(&["rotate"]);
        Pickup::Live
    }

    fn secrets(&self, _: &Dir) -> Vec<Vec<u8>> {
        self.kv.secrets()
    }

    async fn kek(&self, _: &Dir, e: &EncryptResponse) -> Option<Vec<u8>> {
        Some(self.kv.unwrap(&e.key_id, &e.annotations[KEK_ANNOTATION]))
    }
}

#[cfg(feature = "azure")]
impl RemoteServer for Azure {
    const REVOKED: Code = Code::FailedPrecondition;

    /// Disables the current key version.
    async fn revoke(&mut self, _: &Dir) {
        self.kv.admin(&["disable"]);
    }

    async fn recover(&mut self, _: &Dir) -> Recovery {
        self.kv.admin(&["enable"]);
        Recovery::SameKey
    }

    async fn stop(&mut self) {
        self.kv.stop();
    }

    /// The same port, the same keys (the state is on disk).
    async fn restart(&mut self) {
        self.kv.run();
    }
}

#[cfg(feature = "azure")]
impl DenyingServer for Azure {
    /// The plugin's identity loses its role on the key (403 ForbiddenByRbac).
    async fn deny(&mut self, _: &Dir) {
        self.kv.admin(&["deny"]);
    }

    async fn allow(&mut self, _: &Dir) {
        self.kv.admin(&["allow"]);
    }
}

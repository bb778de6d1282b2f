//! One backend test suite: each scenario is written once, in `scenarios.rs`, and runs as its own
//! test against every real root-key server (`cargo test --test plugin suite`), the servers
//! started once per test so the tests run in parallel.
//!
//! A server plugs in through [`RootKeyServer`] (what every backend has: a current root key that
//! can be rotated, secrets that must never reach a log) and, when it is a server of its own,
//! [`RemoteServer`] (authoritative revocation, recovery, an outage). The local key-file backend
//! has no server, so it runs only the first kind of scenario.
//!
//! Adding a backend's harness is one impl: write `impl RootKeyServer for YourKms` (and
//! `impl RemoteServer` if it is a server) in `servers.rs`, wrapping the process harness in
//! `integration/common/`, then name it once in `every_server!` (and `every_remote_server!`)
//! below. No scenario changes.

mod scenarios;
mod servers;

use std::path::{Path, PathBuf};

use kms_plugin::client::Client;
use kms_plugin::proto::v2::{EncryptResponse, StatusRequest, StatusResponse};
use tonic::Code;

use crate::common::{Dir, Plugin, encrypt, rand_bytes};

/// How a running plugin learns of a new current root key.
#[derive(Debug, PartialEq, Eq)]
pub enum Pickup {
    /// Its probe sees the server's new current key (alias, name, Transit version).
    Live,
    /// The key is named in the plugin's config: it is rewritten and reloaded (SIGHUP).
    Reload,
}

/// What [`RemoteServer::recover`] brought back.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The revoked key itself is usable again: data written under it decrypts.
    SameKey,
    /// A new current key replaced the revoked one, which stays unusable.
    NewKey(Pickup),
}

/// A root-key holder the plugin runs against in a test.
#[allow(async_fn_in_trait)] // used only by this test binary's generic scenarios, never `dyn`
pub trait RootKeyServer: Sized {
    /// Codes a Decrypt of a tampered wrapped KEK may get (DataLoss, unless the server cannot
    /// tell a failed tag from a fault).
    const TAMPERED: &'static [Code] = &[Code::DataLoss];

    /// Starts a server (or makes the key files) with one current root key, under `dir`.
    async fn start(dir: &Dir) -> Self;

    /// The plugin's config for the server's present state: its current key, the keys rotated
    /// away from as decrypt-only, and `extra` (top-level tables, written before `[socket]`).
    fn config(&self, dir: &Dir, extra: &str) -> String;

    /// Environment the plugin needs to reach the server.
    fn env(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// Makes a new root key current; the old one stays usable for Decrypt.
    async fn rotate(&mut self, dir: &Dir) -> Pickup;

    /// Everything that must never appear in the plugin's logs (each at least 16 bytes): PINs,
    /// tokens, secret keys, root keys.
    fn secrets(&self, dir: &Dir) -> Vec<Vec<u8>>;

    /// The plaintext KEK inside `e`, recovered the way the server's administrator could, for
    /// the log scans to search for; None where the root key cannot be used outside the plugin.
    async fn kek(&self, _dir: &Dir, _e: &EncryptResponse) -> Option<Vec<u8>> {
        None
    }
}

/// A root-key server that is a process of its own: it can refuse and it can go away.
#[allow(async_fn_in_trait)]
pub trait RemoteServer: RootKeyServer {
    /// The Status code once the server has revoked the current key.
    const REVOKED: Code;

    /// Revokes or disables the current key the server's own authoritative way.
    async fn revoke(&mut self, dir: &Dir);

    /// Makes the server usable again after [`RemoteServer::revoke`].
    async fn recover(&mut self, dir: &Dir) -> Recovery;

    /// The server stops answering; its keys survive.
    async fn stop(&mut self);

    /// The server answers again, with the keys it had.
    async fn restart(&mut self);
}

/// A key manager whose access control can take the plugin's permission away (IAM, RBAC, an
/// access policy) and give it back, the key itself untouched.
#[allow(async_fn_in_trait)]
#[cfg_attr(not(any(feature = "gcp", feature = "azure")), allow(dead_code))]
pub trait DenyingServer: RemoteServer {
    /// Takes the plugin's permission to use the key away.
    async fn deny(&mut self, dir: &Dir);

    /// Gives it back.
    async fn allow(&mut self, dir: &Dir);
}

/// One test's server, scratch directory and the single config path its plugins read.
pub struct Case<S> {
    pub dir: Dir,
    pub server: S,
    extra: String,
    config: PathBuf,
}

impl<S: RootKeyServer> Case<S> {
    /// Starts the server; plugins get `extra` in their config.
    pub async fn new(extra: &str) -> Self {
        let dir = Dir::new();
        let server = S::start(&dir).await;
        let config = dir.path("plugin.toml");
        Case {
            dir,
            server,
            extra: extra.to_string(),
            config,
        }
    }

    /// (Re)writes the config for the server's present state; a reload rereads the same path.
    pub fn write_config(&self) -> &Path {
        std::fs::write(&self.config, self.server.config(&self.dir, &self.extra)).unwrap();
        &self.config
    }

    /// Starts a plugin on the case's socket and waits until it answers.
    pub async fn plugin(&self) -> Plugin {
        Plugin::start_env(self.write_config(), &self.server.env()).await
    }

    /// Like [`Case::plugin`], logging at trace level.
    pub async fn traced_plugin(&self) -> Plugin {
        let mut env = self.server.env();
        env.push(("RUST_LOG", "trace".into()));
        Plugin::start_env(self.write_config(), &env).await
    }

    /// Rewrites the config and asks `plugin` to reload it.
    pub fn reload(&self, plugin: &Plugin) {
        self.write_config();
        plugin.signal("HUP");
    }

    /// A seed and its ciphertext under a KEK the case's plugins have never seen: made by
    /// another plugin instance, on a socket of its own.
    pub async fn cold(&self) -> (Vec<u8>, EncryptResponse) {
        let socket = self.dir.path(&format!("maker-{}/kms.sock", crate::common::rand_hex(4)));
        let text = self
            .server
            .config(&self.dir, "")
            .replace(&self.dir.socket(), &socket.display().to_string());
        let maker = Plugin::start_env(&self.dir.write_config(&text), &self.server.env()).await;
        let seed = rand_bytes(32);
        let e = encrypt(&mut maker.client().await, &seed).await;
        maker.stop().await;
        (seed, e)
    }
}

/// Status, or the refusal, without panicking.
pub async fn try_status(c: &Client) -> Result<StatusResponse, tonic::Status> {
    c.clone().status(StatusRequest {}).await.map(|r| r.into_inner())
}

/// Generates `mod $scenario { #[tokio::test] fn <test>() }`, one test per listed server.
macro_rules! server_tests {
    ($scenario:ident: $($(#[cfg($on:meta)])? $server:ident => $test:ident),+ $(,)?) => {
        mod $scenario {
            #[allow(unused_imports)] // every server of the list may be left out by its feature
            use super::servers::*;
            $(
                $(#[cfg($on)])?
                #[tokio::test]
                async fn $test() {
                    super::scenarios::$scenario::<$server>().await
                }
            )+
        }
    };
}

/// A scenario against every server: add a new backend's harness here.
macro_rules! every_server {
    ($scenario:ident) => {
        server_tests!($scenario: Local => local, Pkcs11 => pkcs11_softhsm, Aws => aws_moto,
            Vault => vault_openbao, Kmip => kmip_pykmip, #[cfg(feature = "gcp")] Gcp => gcp_emulated,
            #[cfg(feature = "azure")] Azure => azure_emulated);
    };
}

/// [`every_server!`] for the scenarios that need a server process of its own.
macro_rules! every_remote_server {
    ($scenario:ident) => {
        server_tests!($scenario: Pkcs11 => pkcs11_softhsm, Aws => aws_moto, Vault => vault_openbao,
            Kmip => kmip_pykmip, #[cfg(feature = "gcp")] Gcp => gcp_emulated,
            #[cfg(feature = "azure")] Azure => azure_emulated);
    };
}

/// [`every_server!`] for the scenarios that need a [`DenyingServer`]: the cloud key managers.
macro_rules! every_denying_server {
    ($scenario:ident) => {
        server_tests!($scenario: #[cfg(feature = "gcp")] Gcp => gcp_emulated,
            #[cfg(feature = "azure")] Azure => azure_emulated);
    };
}

every_server!(round_trip_restart_and_tamper);
every_server!(rotation_keeps_old_ciphertexts);
every_server!(concurrent_cold_decrypts_make_one_unwrap);
every_server!(trace_logs_carry_no_secrets);
every_remote_server!(revocation_purges_and_recovers);
every_remote_server!(outage_keeps_hot_paths_and_heals);
every_denying_server!(permission_denied_refuses_and_heals);

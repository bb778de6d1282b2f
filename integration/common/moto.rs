//! A real AWS-KMS-compatible server for the AWS tests: moto's server mode on 127.0.0.1, started
//! per test on a free port (installed by integration/test.sh into .venv), plus an SDK client to
//! create, disable and alias keys the way an operator would.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use aws_sdk_kms::Client;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};

pub struct Moto {
    child: Child,
    pub endpoint: String,
    pub client: Client,
}

fn moto_server() -> String {
    std::env::var("KMS_TEST_MOTO_SERVER").unwrap_or_else(|_| {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/moto_server");
        assert!(
            std::path::Path::new(local).exists(),
            "moto_server not found: run integration/test.sh (it installs moto[server] into .venv)"
        );
        local.to_string()
    })
}

impl Moto {
    pub async fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let http = aws_smithy_http_client::Builder::new().build_http();
        let config = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "static"))
            .endpoint_url(&endpoint)
            .http_client(http)
            .build();
        let moto = Moto {
            child,
            endpoint,
            client: Client::from_conf(config),
        };
        super::eventually("moto_server to come up", || async {
            moto.client.list_keys().send().await.is_ok()
        })
        .await;
        moto
    }

    /// Creates a symmetric key and returns its ARN.
    pub async fn create_key(&self) -> String {
        let out = self.client.create_key().send().await.unwrap();
        out.key_metadata.unwrap().arn.unwrap()
    }

    pub async fn alias(&self, alias: &str, arn: &str) {
        if self
            .client
            .create_alias()
            .alias_name(alias)
            .target_key_id(arn)
            .send()
            .await
            .is_err()
        {
            self.client
                .update_alias()
                .alias_name(alias)
                .target_key_id(arn)
                .send()
                .await
                .unwrap();
        }
    }

    pub async fn set_enabled(&self, arn: &str, enabled: bool) {
        // moto's Enable/DisableKey take the bare key id, not the ARN.
        let arn = arn.rsplit('/').next().unwrap();
        if enabled {
            self.client.enable_key().key_id(arn).send().await.unwrap();
        } else {
            self.client.disable_key().key_id(arn).send().await.unwrap();
        }
    }

    /// Freezes (SIGSTOP) or resumes (SIGCONT) the server process: a real outage, state kept.
    pub fn pause(&self, paused: bool) {
        let sig = if paused { "-STOP" } else { "-CONT" };
        assert!(
            Command::new("kill")
                .args([sig, &self.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    /// The environment the plugin needs: static test credentials, no instance metadata.
    pub fn env() -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// A plugin config for this server.
    pub fn config(&self, dir: &super::Dir, key: &str, old: &[&str], extra: &str) -> std::path::PathBuf {
        let old: Vec<String> = old.iter().map(|k| format!("{k:?}")).collect();
        dir.write_config(&format!(
            "{extra}\n[socket]\npath = {:?}\n[backend]\ntype = \"aws\"\nkey = {key:?}\nregion = \"us-east-1\"\nendpoint = {:?}\ndecrypt_only_keys = [{}]\ncall_timeout = \"1s\"\nattempt_timeout = \"400ms\"\n",
            dir.socket(),
            self.endpoint,
            old.join(", ")
        ))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

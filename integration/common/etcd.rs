//! A real etcd (Debian's `etcd-server`, /usr/bin/etcd) on loopback with a temporary data dir,
//! and a test-only Put for writing fixtures in the apiserver's storage formats; and a fake
//! etcd serving only KV.Range, for replies a real etcd never gives.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_plugin::inventory::etcd::pb::etcdserverpb::kv_client::KvClient;
use kms_plugin::inventory::etcd::pb::etcdserverpb::kv_server::{Kv, KvServer};
use kms_plugin::inventory::etcd::pb::etcdserverpb::{PutRequest, PutResponse, RangeRequest, RangeResponse};
use kms_plugin::inventory::etcd::{self, Connection};
use tonic::transport::Channel;

use super::Dir;
use super::openbao::Pki;

pub const ETCD: &str = "/usr/bin/etcd";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running etcd; killed on drop.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    pub pki: Option<Pki>,
    log: PathBuf,
    channel: Option<Channel>,
}

impl Etcd {
    /// Plain HTTP on a free loopback port.
    pub async fn start(dir: &Dir) -> Etcd {
        Self::spawn(dir, None).await
    }

    /// HTTPS with client-certificate authentication (the CA in `pki` signs both sides).
    pub async fn start_tls(dir: &Dir) -> Etcd {
        let pki = Pki::new(dir, "etcd-pki");
        Self::spawn(dir, Some(pki)).await
    }

    async fn spawn(dir: &Dir, pki: Option<Pki>) -> Etcd {
        let (client, peer) = (free_port(), free_port());
        let scheme = if pki.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = dir.path(&format!("etcd-{client}"));
        let log = dir.path(&format!("etcd-{client}.log"));
        let mut cmd = Command::new(ETCD);
        cmd.args(["--data-dir", data.to_str().unwrap()])
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(p) = &pki {
            cmd.args(["--cert-file", p.server_cert.to_str().unwrap()])
                .args(["--key-file", p.server_key.to_str().unwrap()])
                .args(["--client-cert-auth", "--trusted-ca-file", p.ca.to_str().unwrap()]);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{ETCD}: {e} (integration/test.sh installs etcd-server)"));
        let mut etcd = Etcd {
            child,
            endpoint,
            pki,
            log,
            channel: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Ready when a Range answers (etcd refuses an empty key, so ask for one).
            let probe = RangeRequest {
                key: b"/".to_vec(),
                ..Default::default()
            };
            let error = match etcd::channel(&etcd.connection()).await {
                Ok(c) => match KvClient::new(c.clone()).range(probe).await {
                    Ok(_) => {
                        etcd.channel = Some(c);
                        return etcd;
                    }
                    Err(e) => format!("{e:?}"),
                },
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "etcd did not start: {error}\n{}",
                std::fs::read_to_string(&etcd.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How the inventory connects, client certificate included.
    pub fn connection(&self) -> Connection {
        Connection {
            endpoints: vec![self.endpoint.clone()],
            cacert: self.pki.as_ref().map(|p| p.ca.clone()),
            cert: self.pki.as_ref().map(|p| p.client_cert.clone()),
            key: self.pki.as_ref().map(|p| p.client_key.clone()),
        }
    }

    /// `kms-plugin inventory` connection flags.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--endpoints".to_string(), self.endpoint.clone()];
        if let Some(p) = &self.pki {
            for (flag, path) in [
                ("--cacert", &p.ca),
                ("--cert", &p.client_cert),
                ("--key", &p.client_key),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
        }
        args
    }

    /// Writes one key.
    pub async fn put(&self, key: &[u8], value: &[u8]) {
        put(self.channel.clone().unwrap(), key.to_vec(), value.to_vec()).await;
    }

    /// Writes many keys with at most `concurrency` puts in flight (for the benchmark).
    pub async fn put_many(&self, kvs: impl Iterator<Item = (Vec<u8>, Vec<u8>)>, concurrency: usize) {
        let mut set = tokio::task::JoinSet::new();
        for (k, v) in kvs {
            if set.len() >= concurrency {
                set.join_next().await.unwrap().unwrap();
            }
            set.spawn(put(self.channel.clone().unwrap(), k, v));
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }
}

/// etcd's KV.Put, called by its path: the library's generated client has no Put method.
async fn put(channel: Channel, key: Vec<u8>, value: Vec<u8>) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = PutRequest {
        key,
        value,
        ..Default::default()
    };
    let codec = tonic_prost::ProstCodec::<PutRequest, PutResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    grpc.unary(tonic::Request::new(request), path, codec).await.unwrap();
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fake etcd on a loopback port whose KV.Range answers with `reply`; stopped on drop.
pub struct FakeEtcd {
    pub endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

struct FakeKv<F>(F);

#[tonic::async_trait]
impl<F: Fn(RangeRequest) -> RangeResponse + Send + Sync + 'static> Kv for FakeKv<F> {
    async fn range(
        &self,
        request: tonic::Request<RangeRequest>,
    ) -> Result<tonic::Response<RangeResponse>, tonic::Status> {
        Ok(tonic::Response::new((self.0)(request.into_inner())))
    }
}

impl FakeEtcd {
    /// Serves on the calling test's runtime.
    pub async fn start(reply: impl Fn(RangeRequest) -> RangeResponse + Send + Sync + 'static) -> FakeEtcd {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder()
            .add_service(KvServer::new(FakeKv(reply)))
            .serve_with_incoming(incoming);
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        FakeEtcd { endpoint, task }
    }
}

impl Drop for FakeEtcd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! A read-only etcd v3 client: connect like etcdctl (endpoints, TLS with client certificates)
//! and page through a prefix with `Range`, a bounded page at a time, at one pinned revision.

use std::path::PathBuf;
use std::time::Duration;

use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Generated from the trimmed protos in `proto/etcd/` (KV.Range only).
pub mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb::RangeRequest;
use pb::etcdserverpb::kv_client::KvClient;
use pb::mvccpb::KeyValue;

use super::shown::{shown, shown_bytes};

/// Where etcd is and how to authenticate, as etcdctl takes it.
#[derive(Clone, Debug)]
pub struct Connection {
    pub endpoints: Vec<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// KVs per page by default. Kubernetes objects are mostly a few KiB, so a page is a few MiB.
/// Larger pages matter: etcd 3.4 counts the rest of the range on every limited Range, so the
/// scan costs O(keys² / page) in etcd (BENCHMARKS.md).
pub const PAGE: i64 = 2000;
/// The largest reply accepted: a page of large objects (etcd allows 1.5 MiB values) is split
/// instead, by halving the page size when etcd's reply would be larger.
const MAX_REPLY: usize = 32 << 20;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// Connects to the first endpoint that answers, in the order given.
pub async fn connect(c: &Connection) -> Result<KvClient<Channel>, String> {
    Ok(KvClient::new(channel(c).await?).max_decoding_message_size(MAX_REPLY))
}

/// A channel to the first endpoint that answers.
pub async fn channel(c: &Connection) -> Result<Channel, String> {
    let tls = match (&c.cert, &c.key) {
        (Some(_), None) | (None, Some(_)) => return Err("--cert and --key go together".into()),
        _ => {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &c.cacert {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "--cacert")?));
            }
            if let (Some(cert), Some(key)) = (&c.cert, &c.key) {
                tls = tls.identity(Identity::from_pem(read(cert, "--cert")?, read(key, "--key")?));
            }
            tls
        }
    };
    let mut errors = Vec::new();
    for url in &c.endpoints {
        let mut endpoint = match Endpoint::from_shared(url.clone()) {
            Ok(e) => e.connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT),
            Err(e) => return Err(format!("--endpoints {url}: {e}")),
        };
        if url.starts_with("https://") {
            if c.cacert.is_none() {
                return Err(format!(
                    "{url}: https needs --cacert (the CA that signed etcd's certificate)"
                ));
            }
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("{url}: TLS: {e}"))?;
        } else if !url.starts_with("http://") {
            return Err(format!("--endpoints {url}: expected http:// or https://"));
        }
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => errors.push(format!("{url}: {}", chain(&e))),
        }
    }
    Err(format!("no etcd endpoint answered: {}", errors.join("; ")))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The end of the range of keys starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix is empty): to the end of the keyspace.
    vec![0]
}

/// Pages through every key under a prefix. Only one page is held at a time.
pub struct Pager {
    client: KvClient<Channel>,
    next: Vec<u8>,
    /// The previous page's last key (`next` is just after it), for errors.
    last: Option<Vec<u8>>,
    end: Vec<u8>,
    /// 0 until the first reply, then that reply's revision: every page sees the same snapshot.
    revision: i64,
    limit: i64,
    page: i64,
    done: bool,
}

impl Pager {
    /// Pages of at most `page` KVs (fewer while values are large).
    pub fn new(client: KvClient<Channel>, prefix: &[u8], page: i64) -> Self {
        let page = page.max(1);
        let next = if prefix.is_empty() { vec![0] } else { prefix.to_vec() };
        Self {
            client,
            next,
            last: None,
            end: prefix_end(prefix),
            revision: 0,
            limit: page,
            page,
            done: false,
        }
    }

    /// The revision the scan reads at (0 before the first page).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The next page, or `None` at the end.
    pub async fn next_page(&mut self) -> Result<Option<Vec<KeyValue>>, String> {
        if self.done {
            return Ok(None);
        }
        let reply = loop {
            let request = RangeRequest {
                key: self.next.clone(),
                range_end: self.end.clone(),
                limit: self.limit,
                revision: self.revision,
                ..Default::default()
            };
            match self.client.range(request).await {
                Ok(r) => break r.into_inner(),
                Err(s) if s.message().contains("compacted") => {
                    return Err(format!(
                        "etcd compacted revision {} during the scan; run again",
                        self.revision
                    ));
                }
                // The reply was larger than MAX_REPLY (or etcd's own send limit): smaller pages.
                Err(s) if matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted) && self.limit > 1 => {
                    self.limit = (self.limit / 2).max(1);
                }
                Err(s) => return Err(format!("etcd Range: {:?}: {}", s.code(), shown(s.message()))),
            }
        };
        check_page(self.last.as_deref(), &self.next, &self.end, &reply.kvs, reply.more)?;
        if self.revision == 0 {
            self.revision = reply.header.as_ref().map(|h| h.revision).unwrap_or(0);
        }
        match reply.kvs.last() {
            Some(last) if reply.more => {
                // The smallest key after `last`.
                self.next = last.key.clone();
                self.next.push(0);
                self.last = Some(last.key.clone());
            }
            _ => self.done = true,
        }
        // Back to full pages once past the large objects.
        self.limit = (self.limit * 2).min(self.page);
        Ok(Some(reply.kvs))
    }
}

/// A reply must hold keys of [start, end) in ascending order, and some if it says more follow:
/// otherwise the next page would not start past this one, and the scan could repeat keys
/// forever (or, for an empty page, end early and report a partial scan as whole). `last` is the
/// previous page's last key (`start` is just after it), named in the error.
fn check_page(last: Option<&[u8]>, start: &[u8], end: &[u8], kvs: &[KeyValue], more: bool) -> Result<(), String> {
    let stuck = |at: &[u8], why: String| format!("etcd paging did not advance at key {}: {why}", shown_bytes(at));
    if more && kvs.is_empty() {
        return Err(stuck(
            last.unwrap_or(start),
            "an empty page said more keys follow".into(),
        ));
    }
    let mut previous: Option<&[u8]> = None;
    for kv in kvs {
        let key = kv.key.as_slice();
        let advanced = match previous {
            Some(p) => key > p,
            None => key >= start,
        };
        if !advanced {
            let at = previous.or(last).unwrap_or(start);
            let why = if key == at {
                "etcd answered it again".to_string()
            } else {
                format!("etcd answered {}, which sorts before it", shown_bytes(key))
            };
            return Err(stuck(at, why));
        }
        // `[0]` stands for the end of the keyspace.
        if end != [0] && key >= end {
            return Err(format!(
                "etcd Range answered key {}, past the end of the range ({})",
                shown_bytes(key),
                shown_bytes(end)
            ));
        }
        previous = Some(key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{KeyValue, check_page, prefix_end};

    /// `check_page` in the range `/r/` .. `/r0`, with string keys.
    fn page(last: Option<&str>, start: &str, keys: &[&str], more: bool) -> Result<(), String> {
        let kvs: Vec<KeyValue> = keys
            .iter()
            .map(|k| KeyValue {
                key: k.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect();
        check_page(last.map(str::as_bytes), start.as_bytes(), b"/r0", &kvs, more)
    }

    fn stalled(last: Option<&str>, start: &str, keys: &[&str]) -> String {
        page(last, start, keys, true).unwrap_err()
    }

    #[test]
    fn pages_must_advance() {
        assert!(page(None, "/r/", &["/r/", "/r/c"], true).is_ok());
        assert!(page(Some("/r/c"), "/r/c\0", &["/r/c\0", "/r/d"], true).is_ok());
        assert!(page(None, "/r/", &[], false).is_ok());
        let top = KeyValue {
            key: b"\xff\xff".to_vec(),
            ..Default::default()
        };
        assert!(check_page(None, b"\0", b"\0", &[top], false).is_ok());

        assert_eq!(
            stalled(None, "/r/", &[]),
            "etcd paging did not advance at key /r/: an empty page said more keys follow"
        );
        assert_eq!(
            stalled(Some("/r/c"), "/r/c\0", &[]),
            "etcd paging did not advance at key /r/c: an empty page said more keys follow"
        );
        // The previous page's last key again: named as the key paging stalled at.
        assert_eq!(
            stalled(Some("/r/c"), "/r/c\0", &["/r/c"]),
            "etcd paging did not advance at key /r/c: etcd answered it again"
        );
        assert_eq!(
            stalled(Some("/r/c"), "/r/c\0", &["/r/b"]),
            "etcd paging did not advance at key /r/c: etcd answered /r/b, which sorts before it"
        );
        assert_eq!(
            stalled(None, "/r/", &["/q"]),
            "etcd paging did not advance at key /r/: etcd answered /q, which sorts before it"
        );
        // Within a page too.
        assert_eq!(
            stalled(None, "/r/", &["/r/d", "/r/d"]),
            "etcd paging did not advance at key /r/d: etcd answered it again"
        );
        assert!(stalled(None, "/r/", &["/r/d", "/r/c"]).contains("at key /r/d: etcd answered /r/c"));
        assert!(page(None, "/r/", &["/r0"], false).unwrap_err().contains("past the end"));

        // A hostile key is cut and escaped in the message.
        let long = format!("/r/b\n{}", "x".repeat(10_000));
        let err = stalled(Some(&long), &format!("{long}\0"), &[&long]);
        assert!(
            err.len() < 600 && err.contains("/r/b\\u{a}x") && !err.contains('\n'),
            "{err}"
        );
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/registry/"), b"/registry0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }
}

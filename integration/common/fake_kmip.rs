//! A scripted KMIP server for answers no real server gives (an empty Locate, a short
//! plaintext, a flood of identifiers): mutual TLS with the same PKI as the pykmip tests, the
//! crate's own TTLV codec, one AES-256-GCM key named by the test. It runs on a thread of its
//! own, so a test that blocks does not stall it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use kms_plugin::backend::kmip::ttlv::{self, Item, Value, tag};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::openbao::Pki;
use super::{Dir, rand_bytes};

const RESPONSE_HEADER: u32 = 0x42007A;
const TIME_STAMP: u32 = 0x420092;

const LOCATE: u32 = 0x08;
const GET_ATTRIBUTES: u32 = 0x0B;
const ENCRYPT: u32 = 0x1F;
const DECRYPT: u32 = 0x20;

/// The key's Unique Identifier and Initial Date; decoys are older.
pub const KEY_UID: &str = "1";
const KEY_DATE: i64 = 1_700_000_000;
const DECOY_DATE: i64 = 1_600_000_000;

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Like a conforming server.
    Normal,
    /// Locate: Success with zero Unique Identifiers (Get Attributes still says Active).
    LocateEmpty,
    /// Every operation: Operation Failed, General Failure.
    GeneralFailure,
    /// Every operation: Operation Failed, Item Not Found, without the Operation echoed.
    AnonymousNotFound,
    /// Every operation: Operation Failed, Item Not Found, echoing another operation.
    OtherOperation,
    /// Every answer: bytes that are no TTLV message.
    Garbage,
    /// Get Attributes: Success without the State.
    NoState,
    /// The key Deactivated: Locate finds no Active key, Get Attributes says Deactivated.
    /// `once`: for one probe only (back to Normal after that Get Attributes).
    Deactivated { once: bool },
    /// The key destroyed and gone: Locate finds nothing, every operation on it is Item Not
    /// Found. `once` as above.
    Gone { once: bool },
    /// Locate: Success with `n` Unique Identifiers (the key and older Active decoys), cut to
    /// Maximum Items if `honor_max`.
    LocateFlood { n: usize, honor_max: bool },
    /// Decrypt: Success with a 31-byte plaintext.
    DecryptShort,
}

/// What the server has been asked.
#[derive(Default)]
pub struct Counts {
    pub locates: AtomicU64,
    pub get_attributes: AtomicU64,
    pub decrypts: AtomicU64,
    /// The most Get Attributes requests seen between two Locates (one probe's work).
    pub max_get_attributes_per_locate: AtomicU64,
    since_locate: AtomicU64,
}

struct Shared {
    mode: Mutex<Mode>,
    key: LessSafeKey,
    counts: Counts,
}

/// A running fake server; stops when dropped.
pub struct FakeKmip {
    pub port: u16,
    pub pki: Pki,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeKmip {
    /// Starts a server with its own PKI in `dir`, in Mode::Normal.
    pub fn start(dir: &Dir) -> FakeKmip {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let pki = Pki::new(dir, &format!("fake-kmip-pki-{port}"));
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&pki)));
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &rand_bytes(32)).unwrap());
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Normal),
            key,
            counts: Counts::default(),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let state = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => {
                            let Ok((tcp, _)) = accepted else { continue };
                            let (tls, state) = (tls.clone(), Arc::clone(&state));
                            tokio::spawn(async move {
                                if let Ok(conn) = tls.accept(tcp).await {
                                    serve(conn, &state).await;
                                }
                            });
                        }
                    }
                }
            });
        });
        FakeKmip {
            port,
            pki,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// How the server answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// What the server has been asked so far.
    pub fn counts(&self) -> &Counts {
        &self.shared.counts
    }

    /// A plugin config for this server with `key_name` current.
    pub fn config(&self, dir: &Dir, key_name: &str, extra: &str) -> std::path::PathBuf {
        super::kmip::config_for(dir, self.port, &self.pki, key_name, "", extra)
    }
}

impl Drop for FakeKmip {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn server_config(pki: &Pki) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .unwrap();
    let chain = CertificateDer::pem_file_iter(&pki.server_cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap()
}

/// Answers requests on one connection until the client closes it.
async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut conn: S, state: &Shared) {
    loop {
        let mut header = [0u8; 8];
        if conn.read_exact(&mut header).await.is_err() {
            return;
        }
        let Ok(total) = ttlv::message_len(&header) else { return };
        let mut buf = vec![0u8; total];
        buf[..8].copy_from_slice(&header);
        if conn.read_exact(&mut buf[8..]).await.is_err() {
            return;
        }
        let Ok(request) = Item::decode(&buf) else { return };
        let out = respond(&request, state);
        if conn.write_all(&out).await.is_err() || conn.flush().await.is_err() {
            return;
        }
    }
}

fn attribute(name: &str, value: Value) -> Item {
    Item::structure(
        tag::ATTRIBUTE,
        vec![
            Item::new(tag::ATTRIBUTE_NAME, Value::Text(name.into())),
            Item::new(tag::ATTRIBUTE_VALUE, value),
        ],
    )
}

fn bytes(payload: &Item, t: u32) -> Vec<u8> {
    payload.child(t).and_then(Item::as_bytes).unwrap_or_default().to_vec()
}

/// The bytes answering `request`.
fn respond(request: &Item, state: &Shared) -> Vec<u8> {
    let mode = *state.mode.lock().unwrap();
    let batch = request
        .child(tag::BATCH_ITEM)
        .cloned()
        .unwrap_or(Item::structure(0, vec![]));
    let operation = batch.child(tag::OPERATION).and_then(Item::as_enum).unwrap_or(0);
    let payload = batch
        .child(tag::REQUEST_PAYLOAD)
        .cloned()
        .unwrap_or(Item::structure(0, vec![]));
    let result = perform(operation, &payload, mode, state);
    let item = match mode {
        Mode::Garbage => {
            // A Response Message structure whose content is no TTLV.
            let mut out = vec![0x42, 0x00, 0x7B, 0x01, 0, 0, 0, 16];
            out.extend_from_slice(&[0xFF; 16]);
            return out;
        }
        Mode::GeneralFailure => refusal(Some(operation), 0x100),
        Mode::AnonymousNotFound => refusal(None, 0x01),
        Mode::OtherOperation => refusal(Some(if operation == DECRYPT { ENCRYPT } else { DECRYPT }), 0x01),
        _ => match result {
            Ok(payload) => vec![
                Item::new(tag::OPERATION, Value::Enumeration(operation)),
                Item::new(tag::RESULT_STATUS, Value::Enumeration(0)),
                Item::structure(tag::RESPONSE_PAYLOAD, payload),
            ],
            Err(reason) => refusal(Some(operation), reason),
        },
    };
    let message = Item::structure(
        tag::RESPONSE_MESSAGE,
        vec![
            Item::structure(
                RESPONSE_HEADER,
                vec![
                    Item::structure(
                        tag::PROTOCOL_VERSION,
                        vec![
                            Item::new(tag::PROTOCOL_VERSION_MAJOR, Value::Integer(1)),
                            Item::new(tag::PROTOCOL_VERSION_MINOR, Value::Integer(4)),
                        ],
                    ),
                    Item::new(TIME_STAMP, Value::DateTime(KEY_DATE)),
                    Item::new(tag::BATCH_COUNT, Value::Integer(1)),
                ],
            ),
            Item::structure(tag::BATCH_ITEM, item),
        ],
    );
    let mut out = Vec::new();
    message.encode(&mut out);
    out
}

/// A batch item refusing with Operation Failed and `reason`.
fn refusal(operation: Option<u32>, reason: u32) -> Vec<Item> {
    let mut item: Vec<Item> = operation
        .map(|o| Item::new(tag::OPERATION, Value::Enumeration(o)))
        .into_iter()
        .collect();
    item.push(Item::new(tag::RESULT_STATUS, Value::Enumeration(1)));
    item.push(Item::new(tag::RESULT_REASON, Value::Enumeration(reason)));
    item.push(Item::new(
        tag::RESULT_MESSAGE,
        Value::Text("refused by the fake".into()),
    ));
    item
}

/// Performs `operation` (counting it): Ok(payload items) or Err(result reason).
fn perform(operation: u32, payload: &Item, mode: Mode, state: &Shared) -> Result<Vec<Item>, u32> {
    let counts = &state.counts;
    let uid = payload
        .child(tag::UNIQUE_IDENTIFIER)
        .and_then(Item::as_text)
        .unwrap_or("")
        .to_string();
    let uid_item = || Item::new(tag::UNIQUE_IDENTIFIER, Value::Text(uid.clone()));
    let gone = matches!(mode, Mode::Gone { .. }) && uid == KEY_UID;
    match operation {
        LOCATE => {
            counts.locates.fetch_add(1, Relaxed);
            counts.since_locate.store(0, Relaxed);
            let max = payload.child(tag::MAXIMUM_ITEMS).and_then(|i| match i.value {
                Value::Integer(n) => Some(n.max(0) as usize),
                _ => None,
            });
            let uids: Vec<String> = match mode {
                Mode::LocateEmpty | Mode::Deactivated { .. } | Mode::Gone { .. } => vec![],
                Mode::LocateFlood { n, honor_max } => std::iter::once(KEY_UID.to_string())
                    .chain((1..n).map(|i| format!("d{i}")))
                    .take(if honor_max {
                        max.unwrap_or(usize::MAX)
                    } else {
                        usize::MAX
                    })
                    .collect(),
                _ => vec![KEY_UID.to_string()],
            };
            Ok(uids
                .into_iter()
                .map(|u| Item::new(tag::UNIQUE_IDENTIFIER, Value::Text(u)))
                .collect())
        }
        GET_ATTRIBUTES => {
            counts.get_attributes.fetch_add(1, Relaxed);
            let n = counts.since_locate.fetch_add(1, Relaxed) + 1;
            counts.max_get_attributes_per_locate.fetch_max(n, Relaxed);
            let (date, key_state) = match uid.as_str() {
                KEY_UID if gone => (None, 0),
                KEY_UID if matches!(mode, Mode::Deactivated { .. }) => (Some(KEY_DATE), 3),
                KEY_UID => (Some(KEY_DATE), 2),
                d if d.starts_with('d') => (Some(DECOY_DATE), 2),
                _ => (None, 0),
            };
            if let (Mode::Deactivated { once: true } | Mode::Gone { once: true }, KEY_UID) = (mode, uid.as_str()) {
                *state.mode.lock().unwrap() = Mode::Normal;
            }
            // Item Not Found.
            let date = date.ok_or(0x01u32)?;
            let mut items = vec![uid_item()];
            if mode != Mode::NoState {
                items.push(attribute("State", Value::Enumeration(key_state)));
            }
            items.push(attribute("Initial Date", Value::DateTime(date)));
            Ok(items)
        }
        ENCRYPT | DECRYPT if uid != KEY_UID || gone => Err(0x01),
        ENCRYPT => {
            let nonce = Nonce::try_assume_unique_for_key(&bytes(payload, tag::IV_COUNTER_NONCE));
            let aad = bytes(payload, tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA);
            let mut data = bytes(payload, tag::DATA);
            match nonce.and_then(|n| state.key.seal_in_place_separate_tag(n, Aad::from(aad), &mut data)) {
                Ok(auth) => Ok(vec![
                    uid_item(),
                    Item::new(tag::DATA, Value::Bytes(data)),
                    Item::new(tag::AUTHENTICATED_ENCRYPTION_TAG, Value::Bytes(auth.as_ref().to_vec())),
                ]),
                // Cryptographic Failure.
                Err(_) => Err(0x0A),
            }
        }
        DECRYPT => {
            counts.decrypts.fetch_add(1, Relaxed);
            let nonce = Nonce::try_assume_unique_for_key(&bytes(payload, tag::IV_COUNTER_NONCE));
            let aad = bytes(payload, tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA);
            let mut data = bytes(payload, tag::DATA);
            data.extend_from_slice(&bytes(payload, tag::AUTHENTICATED_ENCRYPTION_TAG));
            let plain = nonce
                .and_then(|n| {
                    state
                        .key
                        .open_in_place(n, Aad::from(aad), &mut data)
                        .map(|p| p.to_vec())
                })
                .map_err(|_| 0x0Au32)?;
            let len = if mode == Mode::DecryptShort { 31 } else { plain.len() };
            Ok(vec![
                uid_item(),
                Item::new(tag::DATA, Value::Bytes(plain[..len].to_vec())),
            ])
        }
        // Operation Not Supported.
        _ => Err(0x05),
    }
}

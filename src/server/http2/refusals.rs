//! The server's bytes, watched for the two frames that end a stream or a connection with an
//! error code (RST_STREAM, GOAWAY). h2 refuses malformed requests by itself, logging only at
//! debug; here every such refusal is counted and logged where operators look.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use super::super::edge::LogBudget;
use super::responses;

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    frame: &'static str,
    reason: &'static str,
}

/// The refusal counter and log budget, shared by every connection.
#[derive(Default)]
pub struct Refusals {
    counts: Family<Labels, Counter>,
    /// The edge layer's rule: at most 20 lines a second, so a flood of bad requests (over any
    /// number of connections) cannot flood the log; every refusal is still counted.
    log_budget: LogBudget,
}

impl Refusals {
    /// Registers `http2_refusals` into `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "http2_refusals",
            "Streams (frame=rst_stream) and connections (frame=goaway) the HTTP/2 layer ended with an error code, and requests it answered itself (frame=response, reason=status_431), by reason",
            self.counts.clone(),
        );
    }

    /// How many refusals of `frame` (rst_stream, goaway, response) with `reason` so far.
    pub fn count(&self, frame: &'static str, reason: &'static str) -> u64 {
        self.counts.get_or_create(&Labels { frame, reason }).get()
    }
}

/// A frame that ended a stream or the connection with an error, or refused a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Stream {
        stream: u32,
        code: u32,
    },
    Connection {
        last_stream: u32,
        code: u32,
    },
    /// A response other than 200: h2's own 431 for headers over the limit.
    Response {
        stream: u32,
        status: u16,
    },
}

/// The server-to-client direction of one connection: frame boundaries, the error code of each
/// RST_STREAM and GOAWAY, and the `:status` of each response.
#[derive(Default)]
pub struct Outbound {
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come.
    remaining: usize,
    /// The first 8 payload bytes of a RST_STREAM or GOAWAY.
    fields: [u8; 8],
    fields_have: usize,
    /// The header block being collected: the HEADERS frame's flags, stream and payload length,
    /// then all its frames' payloads.
    block_flags: u8,
    block_stream: u32,
    block_first_len: usize,
    block: Vec<u8>,
    collecting: bool,
    table: responses::Table,
    /// Set when the server's header blocks could not be followed (never expected from h2).
    statuses_lost: bool,
}

impl Outbound {
    /// Follows `bytes` (what the server wrote, in order); calls `on` for each refusal.
    pub fn observe(&mut self, mut bytes: &[u8], mut on: impl FnMut(Refusal)) {
        while !bytes.is_empty() {
            if self.have < 9 {
                let k = (9 - self.have).min(bytes.len());
                self.header[self.have..self.have + k].copy_from_slice(&bytes[..k]);
                self.have += k;
                bytes = &bytes[k..];
                if self.have == 9 {
                    self.start_frame();
                    if self.remaining == 0 {
                        self.end_frame(&mut on);
                    }
                }
                continue;
            }
            let k = self.remaining.min(bytes.len());
            self.payload(&bytes[..k], &mut on);
            self.remaining -= k;
            bytes = &bytes[k..];
            if self.remaining == 0 {
                self.end_frame(&mut on);
            }
        }
    }

    fn start_frame(&mut self) {
        let h = self.header;
        self.remaining = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        self.fields_have = 0;
        self.collecting = !self.statuses_lost && matches!(h[3], HEADERS | CONTINUATION);
        if h[3] == HEADERS {
            self.block.clear();
            self.block_flags = h[4];
            self.block_stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            self.block_first_len = self.remaining;
        }
    }

    fn payload(&mut self, bytes: &[u8], on: &mut impl FnMut(Refusal)) {
        if self.collecting {
            if self.block.len() + bytes.len() > super::inbound::MAX_BLOCK {
                self.lose_statuses();
            } else {
                self.block.extend_from_slice(bytes);
            }
        }
        let needed: usize = match self.header[3] {
            RST_STREAM => 4,
            GOAWAY => 8,
            _ => return,
        };
        let take = needed.saturating_sub(self.fields_have).min(bytes.len());
        self.fields[self.fields_have..self.fields_have + take].copy_from_slice(&bytes[..take]);
        self.fields_have += take;
        if take > 0 && self.fields_have == needed {
            let f = self.fields;
            let word = |i: usize| u32::from_be_bytes([f[i], f[i + 1], f[i + 2], f[i + 3]]);
            let h = self.header;
            on(match h[3] {
                RST_STREAM => Refusal::Stream {
                    stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                    code: word(0),
                },
                _ => Refusal::Connection {
                    last_stream: word(0) & 0x7fff_ffff,
                    code: word(4),
                },
            });
        }
    }

    fn end_frame(&mut self, on: &mut impl FnMut(Refusal)) {
        self.have = 0;
        if !self.collecting || self.header[4] & END_HEADERS == 0 {
            return;
        }
        self.collecting = false;
        let first_len = self.block_first_len.min(self.block.len());
        let (first, rest) = self.block.split_at(first_len);
        let Some((_, first)) = super::inbound::headers_payload(self.block_flags, first) else {
            return self.lose_statuses();
        };
        let mut fragment = first.to_vec();
        fragment.extend_from_slice(rest);
        match responses::status(&fragment, &mut self.table) {
            Ok(Some(status)) if status != b"200" => on(Refusal::Response {
                stream: self.block_stream,
                status: std::str::from_utf8(&status)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
            }),
            Ok(_) => {}
            Err(_) => self.lose_statuses(),
        }
    }

    fn lose_statuses(&mut self) {
        self.statuses_lost = true;
        self.collecting = false;
        self.block = Vec::new();
    }
}

impl Refusals {
    /// Counts and logs `refusal` (a NO_ERROR reset or GOAWAY is a normal end: ignored).
    pub fn record(&self, refusal: Refusal, uid: Option<u32>) {
        let (frame, code, stream) = match refusal {
            Refusal::Stream { stream, code } => ("rst_stream", code, stream),
            Refusal::Connection { last_stream, code } => ("goaway", code, last_stream),
            Refusal::Response { stream, status } => ("response", u32::from(status), stream),
        };
        if code == 0 && frame != "response" {
            return;
        }
        let reason = match frame {
            "response" if code == 431 => "status_431",
            "response" => "status_other",
            _ => reason(code),
        };
        self.count_one(frame, reason);
        let Some(suppressed) = self.log_budget.take() else {
            return;
        };
        let hint = match (frame, code) {
            ("goaway", 0x1) => "the client broke HTTP/2 framing or header compression; RUST_LOG=h2=debug names it",
            _ => hint(code),
        };
        match (frame, code) {
            // The server gave up a stream it had accepted (its response was dropped).
            ("rst_stream", 0x8) => info!(uid, stream, reason, suppressed, "HTTP/2 stream cancelled by the plugin"),
            ("rst_stream", _) => warn!(uid, stream, reason, hint, suppressed, "HTTP/2 stream refused"),
            ("response", 431) => warn!(
                uid,
                stream,
                reason,
                hint = "request headers over 16 KiB",
                suppressed,
                "HTTP/2 stream refused"
            ),
            ("response", _) => warn!(
                uid,
                stream,
                status = code,
                suppressed,
                "HTTP/2 stream answered with an HTTP error"
            ),
            _ => warn!(
                uid,
                last_stream = stream,
                reason,
                hint,
                suppressed,
                "HTTP/2 connection closed with an error"
            ),
        }
    }

    fn count_one(&self, frame: &'static str, reason: &'static str) {
        self.counts.get_or_create(&Labels { frame, reason }).inc();
    }
}

/// RFC 9113 §7 error code names, as metric label values.
fn reason(code: u32) -> &'static str {
    match code {
        0x0 => "no_error",
        0x1 => "protocol_error",
        0x2 => "internal_error",
        0x3 => "flow_control_error",
        0x4 => "settings_timeout",
        0x5 => "stream_closed",
        0x6 => "frame_size_error",
        0x7 => "refused_stream",
        0x8 => "cancel",
        0x9 => "compression_error",
        0xa => "connect_error",
        0xb => "enhance_your_calm",
        0xc => "inadequate_security",
        0xd => "http_1_1_required",
        _ => "unknown",
    }
}

/// What the client most likely did, for the log line.
fn hint(code: u32) -> &'static str {
    match code {
        0x1 => {
            "the client broke HTTP/2 rules (a malformed or missing pseudo-header such as :path, :method, :scheme); RUST_LOG=h2=debug names it"
        }
        0x7 => "request headers over 16 KiB, or more concurrent calls than the server allows",
        0x6 => "a frame over the size limit",
        0x9 => "the client's header compression (HPACK) state is broken",
        0xb => "the client reset or pinged too often",
        _ => "see RUST_LOG=h2=debug",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let flags = if kind == HEADERS { END_HEADERS } else { 0 };
        frame_flags(kind, flags, stream, payload)
    }

    fn frame_flags(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn refusals(bytes: &[u8], chunk: usize) -> Vec<Refusal> {
        let mut out = Outbound::default();
        let mut seen = Vec::new();
        for piece in bytes.chunks(chunk) {
            out.observe(piece, |r| seen.push(r));
        }
        seen
    }

    #[test]
    fn resets_and_goaways_are_found_however_the_writes_are_split() {
        let mut bytes = frame(0x4, 0, &[0, 3, 0, 0, 0, 100]); // SETTINGS
        bytes.extend(frame(0x1, 1, &[0x88])); // HEADERS
        bytes.extend(frame(0x0, 1, &[0; 20_000])); // DATA
        bytes.extend(frame(RST_STREAM, 3, &1u32.to_be_bytes()));
        bytes.extend(frame(0x6, 0, &[0; 8])); // PING
        // h2's 431, its header block split over HEADERS and CONTINUATION.
        bytes.extend(frame_flags(HEADERS, 0, 5, &[0x48, 3]));
        bytes.extend(frame_flags(CONTINUATION, END_HEADERS, 5, b"431"));
        bytes.extend(frame(
            GOAWAY,
            0,
            &[0, 0, 0, 5, 0, 0, 0, 9, b'd', b'e', b'b', b'u', b'g'],
        ));
        for chunk in [1, 2, 5, 9, 4096, 100_000] {
            assert_eq!(
                refusals(&bytes, chunk),
                vec![
                    Refusal::Stream { stream: 3, code: 1 },
                    Refusal::Response { stream: 5, status: 431 },
                    Refusal::Connection {
                        last_stream: 5,
                        code: 9
                    }
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn errors_are_counted_and_normal_ends_are_not() {
        let counts = Refusals::default();
        counts.record(Refusal::Stream { stream: 1, code: 0 }, None);
        counts.record(
            Refusal::Connection {
                last_stream: 1,
                code: 0,
            },
            None,
        );
        for _ in 0..10 {
            counts.record(Refusal::Stream { stream: 1, code: 1 }, Some(0));
        }
        counts.record(
            Refusal::Connection {
                last_stream: 1,
                code: 9,
            },
            None,
        );
        counts.record(Refusal::Response { stream: 3, status: 431 }, None);
        assert_eq!(counts.count("response", "status_431"), 1);
        assert_eq!(counts.count("rst_stream", "protocol_error"), 10);
        assert_eq!(counts.count("goaway", "compression_error"), 1);
        assert_eq!(counts.count("rst_stream", "no_error"), 0);
        assert_eq!(counts.count("goaway", "no_error"), 0);
    }

    #[test]
    fn short_or_random_frames_never_panic() {
        let mut bytes = frame(RST_STREAM, 1, &[0, 0]); // too short for a code: ignored
        bytes.extend(frame(GOAWAY, 0, &[0, 0, 0, 1]));
        bytes.extend(frame(RST_STREAM, 1, &[0, 0, 0, 2]));
        assert_eq!(refusals(&bytes, 3), vec![Refusal::Stream { stream: 1, code: 2 }]);
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut out = Outbound::default();
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let piece: Vec<u8> = seed
                .to_le_bytes()
                .iter()
                .cycle()
                .take((seed % 97) as usize)
                .copied()
                .collect();
            out.observe(&piece, |_| {});
        }
    }
}

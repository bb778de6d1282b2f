//! The client's bytes, frame by frame: each header block (a HEADERS frame and its
//! CONTINUATIONs) is collected whole and passed through [`hpack::rewrite`]; every other frame
//! is copied as it arrives, never buffered. On anything it cannot follow, it stops and copies
//! the rest of the connection untouched, so h2 answers exactly as it would without it.

use super::hpack::{self, Table};

/// What every HTTP/2 client sends first.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest header block collected (all its frames, padding included). h2 refuses header
/// lists over 16 KiB decoded; 64 KiB of encoding leaves room for any client's padding.
pub const MAX_BLOCK: usize = 64 * 1024;
/// The largest frame payload h2 accepts (its SETTINGS_MAX_FRAME_SIZE, the protocol default).
const MAX_FRAME: usize = 16 * 1024;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

#[derive(Clone, Copy)]
enum State {
    Preface,
    FrameHeader,
    /// Copying this many more payload bytes of a frame that is not part of a header block.
    Copy(usize),
    /// Collecting a HEADERS or CONTINUATION frame's payload of `len` bytes.
    HeaderFrame {
        header: [u8; 9],
        len: usize,
    },
    /// Not following the stream any more: every byte is copied.
    Passthrough,
}

/// A header block being collected.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, to hand over untouched when the block is left as it is.
    raw: Vec<u8>,
}

/// The client-to-server direction of one connection.
pub struct Inbound {
    state: State,
    /// The incomplete preface, frame header or header frame payload.
    partial: Vec<u8>,
    block: Option<Block>,
    table: Table,
    rewritten: usize,
    gave_up: Option<&'static str>,
}

impl Default for Inbound {
    fn default() -> Self {
        Self {
            state: State::Preface,
            partial: Vec::new(),
            block: None,
            table: Table::default(),
            rewritten: 0,
            gave_up: None,
        }
    }
}

impl Inbound {
    /// `:authority` values rewritten so far.
    pub fn rewritten(&self) -> usize {
        self.rewritten
    }

    /// Why it stopped following the stream, if it did.
    pub fn gave_up(&self) -> Option<&'static str> {
        self.gave_up
    }

    /// Whether every further byte is copied as is (the caller may then skip the copy).
    pub fn passing_through(&self) -> bool {
        matches!(self.state, State::Passthrough)
    }

    /// Takes the next bytes from the client; appends what h2 should read to `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                State::Passthrough => {
                    out.extend_from_slice(input);
                    return;
                }
                State::Copy(n) => {
                    let k = n.min(input.len());
                    out.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    self.state = if k == n { State::FrameHeader } else { State::Copy(n - k) };
                }
                State::Preface => {
                    if fill(&mut self.partial, &mut input, PREFACE.len()) {
                        let preface = std::mem::take(&mut self.partial);
                        if preface == PREFACE {
                            out.extend_from_slice(&preface);
                            self.state = State::FrameHeader;
                        } else {
                            self.give_up("no HTTP/2 preface", &preface, out);
                        }
                    }
                }
                State::FrameHeader => {
                    if fill(&mut self.partial, &mut input, 9) {
                        let mut header = [0u8; 9];
                        header.copy_from_slice(&self.partial);
                        self.partial.clear();
                        self.frame_header(header, out);
                    }
                }
                State::HeaderFrame { header, len } => {
                    if fill(&mut self.partial, &mut input, len) {
                        let payload = std::mem::take(&mut self.partial);
                        self.header_frame(header, &payload, out);
                    }
                }
            }
        }
    }

    /// The client closed its side: hands over whatever is held, untouched.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        if let State::HeaderFrame { header, .. } = self.state {
            out.extend_from_slice(&header);
        }
        out.append(&mut self.partial);
        self.state = State::Passthrough;
    }

    fn frame_header(&mut self, header: [u8; 9], out: &mut Vec<u8>) {
        let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let kind = header[3];
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let held = match (&self.block, kind) {
            (Some(b), CONTINUATION) if b.stream == stream => b.raw.len(),
            (Some(_), _) => return self.give_up("a frame inside a header block", &header, out),
            (None, HEADERS) => 0,
            (None, CONTINUATION | PUSH_PROMISE) => return self.give_up("an unexpected header block", &header, out),
            (None, _) => {
                out.extend_from_slice(&header);
                self.state = if len == 0 { State::FrameHeader } else { State::Copy(len) };
                return;
            }
        };
        if held + 9 + len > MAX_BLOCK {
            return self.give_up("a header block over 64 KiB", &header, out);
        }
        self.state = State::HeaderFrame { header, len };
        if len == 0 {
            self.header_frame(header, &[], out);
        }
    }

    fn header_frame(&mut self, header: [u8; 9], payload: &[u8], out: &mut Vec<u8>) {
        let flags = header[4];
        self.state = State::FrameHeader;
        match self.block.as_mut() {
            Some(block) => {
                block.fragment.extend_from_slice(payload);
                block.raw.extend_from_slice(&header);
                block.raw.extend_from_slice(payload);
            }
            None => {
                let Some((priority, fragment)) = headers_payload(flags, payload) else {
                    let mut raw = header.to_vec();
                    raw.extend_from_slice(payload);
                    return self.give_up("bad HEADERS padding or priority", &raw, out);
                };
                let mut raw = Vec::with_capacity(9 + payload.len());
                raw.extend_from_slice(&header);
                raw.extend_from_slice(payload);
                self.block = Some(Block {
                    stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                    raw,
                });
            }
        }
        if flags & END_HEADERS != 0 {
            self.end_block(out);
        }
    }

    fn end_block(&mut self, out: &mut Vec<u8>) {
        let Some(block) = self.block.take() else { return };
        let mut rewritten = Vec::with_capacity(block.fragment.len() + 64);
        match hpack::rewrite(&block.fragment, &mut self.table, &mut rewritten) {
            Ok(0) => out.extend_from_slice(&block.raw),
            Ok(n) => {
                self.rewritten += n;
                write_frames(&block, &rewritten, out);
            }
            Err(hpack::Malformed(why)) => {
                self.block = Some(block);
                self.give_up(why, &[], out);
            }
        }
    }

    /// Hands over everything held, then `tail`, and copies from now on.
    fn give_up(&mut self, why: &'static str, tail: &[u8], out: &mut Vec<u8>) {
        self.finish(out);
        out.extend_from_slice(tail);
        self.state = State::Passthrough;
        self.gave_up = Some(why);
    }
}

/// Appends input to `partial` until it holds `want` bytes; true once it does.
fn fill(partial: &mut Vec<u8>, input: &mut &[u8], want: usize) -> bool {
    let k = want.saturating_sub(partial.len()).min(input.len());
    partial.extend_from_slice(&input[..k]);
    *input = &input[k..];
    partial.len() == want
}

/// A HEADERS payload's priority fields and header block fragment, padding removed.
pub(super) fn headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(*p.first()?);
        p = &p[1..];
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        priority = Some(p.get(..5)?.try_into().ok()?);
        p = &p[5..];
    }
    Some((priority, p.get(..p.len().checked_sub(pad)?)?))
}

/// One HEADERS frame and as many CONTINUATIONs as the block needs, without padding.
fn write_frames(block: &Block, fragment: &[u8], out: &mut Vec<u8>) {
    let first_room = MAX_FRAME - if block.priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = fragment.split_at(fragment.len().min(first_room));
    let mut flags = if block.end_stream { END_STREAM } else { 0 };
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    write_frame(HEADERS, flags, block.stream, &[priority, first], out);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        write_frame(CONTINUATION, flags, block.stream, &[chunk], out);
    }
}

fn write_frame(kind: u8, flags: u8, stream: u32, parts: &[&[u8]], out: &mut Vec<u8>) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAD: &[u8] = b"tmp%2Fkms.sock";

    /// A HEADERS block a C-core client sends: :authority as a new-name literal, indexed.
    fn block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x40, 10];
        b.extend_from_slice(b":authority");
        b.push(authority.len() as u8);
        b.extend_from_slice(authority);
        b.extend_from_slice(&[0x83, 0x86]); // :method POST, :scheme http
        b.push(0x44); // :path, indexed name
        b.push(31);
        b.extend_from_slice(b"/v2.KeyManagementService/Status");
        b
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(kind, flags, stream, &[payload], &mut out);
        out
    }

    fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut c = PREFACE.to_vec();
        c.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        for f in frames {
            c.extend_from_slice(f);
        }
        c
    }

    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, Inbound) {
        let mut inbound = Inbound::default();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            inbound.push(piece, &mut out);
        }
        inbound.finish(&mut out);
        (out, inbound)
    }

    #[test]
    fn a_bad_authority_is_rewritten_however_the_bytes_arrive() {
        let data = frame(0x0, END_STREAM, 1, b"\0\0\0\0\0");
        let input = connection(&[frame(HEADERS, END_HEADERS, 1, &block(BAD)), data.clone()]);
        let expected = connection(&[frame(HEADERS, END_HEADERS, 1, &block(b"tmp-2Fkms.sock")), data]);
        for chunk in [1, 2, 7, 9, 24, 1000] {
            let (out, inbound) = run(&input, chunk);
            assert_eq!(out, expected, "chunk {chunk}");
            assert_eq!((inbound.rewritten(), inbound.gave_up()), (1, None));
        }
    }

    #[test]
    fn padding_priority_and_continuations_are_handled() {
        let b = block(BAD);
        let (a, c) = b.split_at(5);
        let mut padded = vec![3];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        let input = connection(&[
            frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &padded),
            frame(CONTINUATION, END_HEADERS, 3, c),
        ]);
        let mut payload = vec![0, 0, 0, 0, 16];
        payload.extend(block(b"tmp-2Fkms.sock"));
        let expected = connection(&[frame(HEADERS, PRIORITY | END_STREAM | END_HEADERS, 3, &payload)]);
        assert_eq!(run(&input, 5).0, expected);
    }

    #[test]
    fn good_blocks_and_other_frames_pass_untouched() {
        let input = connection(&[
            frame(HEADERS, END_HEADERS, 1, &block(b"localhost")),
            frame(0x0, 0, 1, &[7; 40_000]),
            frame(0x8, 0, 0, &[0, 0, 1, 0]),
        ]);
        let (out, inbound) = run(&input, 4096);
        assert_eq!(out, input);
        assert_eq!((inbound.rewritten(), inbound.gave_up()), (0, None));
    }

    #[test]
    fn a_large_rewritten_block_is_split_into_continuations() {
        // A Huffman-coded authority of 20 000 '%' (15 000 octets coded): raw, it needs two frames.
        let value = vec![b'%'; 20_000];
        let coded = super::super::huffman::encode(&value);
        let mut b = vec![0x41];
        hpack::write_int(coded.len(), 7, 0x80, &mut b);
        b.extend_from_slice(&coded);
        let (first, second) = b.split_at(b.len() / 2);
        let input = connection(&[frame(HEADERS, 0, 1, first), frame(CONTINUATION, END_HEADERS, 1, second)]);
        let (out, inbound) = run(&input, 3000);
        assert_eq!((inbound.rewritten(), inbound.gave_up()), (1, None));
        let frames = &out[PREFACE.len() + 9..];
        assert_eq!(&frames[..9], &[0, 0x40, 0, HEADERS, 0, 0, 0, 0, 1]);
        let second = &frames[9 + MAX_FRAME..];
        assert_eq!(second[3..5], [CONTINUATION, END_HEADERS]);
        let mut fragment = frames[9..9 + MAX_FRAME].to_vec();
        fragment.extend_from_slice(&second[9..]);
        let mut expected = vec![0x41];
        hpack::write_int(20_000, 7, 0, &mut expected);
        expected.extend(vec![b'-'; 20_000]);
        assert_eq!(fragment, expected);
    }

    #[test]
    fn anything_it_cannot_follow_is_handed_over_untouched() {
        let cases = [
            // Not HTTP/2.
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            // Bad HPACK (index 0), then a bad authority that is no longer rewritten.
            connection(&[
                frame(HEADERS, END_HEADERS, 1, &[0x80]),
                frame(HEADERS, END_HEADERS, 3, &block(BAD)),
            ]),
            // A DATA frame between HEADERS and CONTINUATION.
            connection(&[
                frame(HEADERS, 0, 1, &block(BAD)),
                frame(0x0, 0, 1, b"x"),
                frame(CONTINUATION, END_HEADERS, 1, &[]),
            ]),
            // Padding longer than the frame.
            connection(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 0x82])]),
            // A header block over the limit.
            connection(&[
                frame(HEADERS, 0, 1, &vec![0x82; MAX_FRAME]),
                frame(CONTINUATION, 0, 1, &vec![0x82; MAX_FRAME]),
                frame(CONTINUATION, 0, 1, &vec![0x82; MAX_FRAME]),
                frame(CONTINUATION, 0, 1, &vec![0x82; MAX_FRAME]),
                frame(CONTINUATION, END_HEADERS, 1, &block(BAD)),
            ]),
            // Truncated mid-block.
            connection(&[frame(HEADERS, END_HEADERS, 1, &block(BAD))[..20].to_vec()]),
        ];
        for (i, input) in cases.iter().enumerate() {
            for chunk in [1, 13, 100_000] {
                let (out, inbound) = run(input, chunk);
                assert_eq!(&out, input, "case {i} chunk {chunk}");
                assert_eq!(inbound.rewritten(), 0, "case {i}");
            }
        }
    }

    #[test]
    fn random_and_mangled_streams_never_panic_and_stay_bounded() {
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let good = connection(&[
            frame(HEADERS, END_HEADERS, 1, &block(BAD)),
            frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"),
            frame(HEADERS, PADDED | END_HEADERS, 3, &[2, 0xbe, 0, 0]),
        ]);
        for i in 0..3000 {
            let mut input = if i % 3 == 0 {
                let mut c = PREFACE.to_vec();
                c.extend((0..next() % 300).map(|_| next() as u8));
                c
            } else {
                good.clone()
            };
            for _ in 0..(next() % 4) {
                let at = next() as usize % input.len();
                input[at] ^= next() as u8;
            }
            input.truncate(next() as usize % (input.len() + 1));
            let mut inbound = Inbound::default();
            let mut out = Vec::new();
            for piece in input.chunks(1 + next() as usize % 50) {
                inbound.push(piece, &mut out);
                assert!(inbound.partial.len() <= MAX_BLOCK);
                assert!(inbound.block.as_ref().is_none_or(|b| b.raw.len() <= MAX_BLOCK));
            }
            inbound.finish(&mut out);
            if inbound.rewritten() == 0 {
                assert_eq!(out, input);
            }
        }
    }
}

//! Just enough HPACK (RFC 7541) to find every `:authority` in a header block and rewrite its
//! value in place, keeping the peer's and h2's dynamic tables in step.
//!
//! The table is mirrored by entry sizes only, plus whether an entry's name is `:authority`; no
//! header value is kept. A rewritten value has the same decoded length as the original, so the
//! entry it makes is the same size and the tables evict the same entries.

use std::collections::VecDeque;

use super::huffman;

/// The largest dynamic table the peer may use: h2's SETTINGS_HEADER_TABLE_SIZE, which the
/// server leaves at the protocol default. A larger size update is refused by h2 as well.
pub const MAX_TABLE_SIZE: usize = 4096;
/// Integers above this (lengths, indexes, table sizes) are nonsense in a bounded block.
const MAX_INT: usize = 1 << 24;

/// A header block this module cannot follow; h2 refuses it too, so the caller just stops
/// rewriting and lets h2 see the bytes as they are.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// The static table's names (RFC 7541 Appendix A); index 1 is `:authority`.
pub(super) const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

#[derive(Clone, Copy)]
struct Entry {
    authority: bool,
    name_len: usize,
    /// RFC 7541 §4.1: name length + value length + 32.
    size: usize,
}

/// The decoder's dynamic table, by entry sizes (newest first).
pub struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max: MAX_TABLE_SIZE,
        }
    }
}

impl Table {
    /// (is `:authority`, name length) of the entry at HPACK `index`.
    fn name(&self, index: usize) -> Result<(bool, usize), Malformed> {
        match index {
            0 => Err(Malformed("index 0")),
            1..=61 => Ok((index == 1, STATIC_NAMES[index - 1].len())),
            _ => self
                .entries
                .get(index - 62)
                .map(|e| (e.authority, e.name_len))
                .ok_or(Malformed("index past the table")),
        }
    }

    fn insert(&mut self, entry: Entry) {
        self.evict_to(self.max.saturating_sub(entry.size));
        if entry.size <= self.max {
            self.size += entry.size;
            self.entries.push_front(entry);
        }
    }

    fn set_max(&mut self, max: usize) -> Result<(), Malformed> {
        if max > MAX_TABLE_SIZE {
            return Err(Malformed("table size update over the limit"));
        }
        self.max = max;
        self.evict_to(max);
        Ok(())
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }
}

/// Rewrites `block` into `out`: every `:authority` value that h2 would refuse becomes one of
/// the same length that it accepts (see [`acceptable`]); everything else is copied byte for
/// byte. Returns how many values it rewrote. On error `out` and `table` are unusable.
pub fn rewrite(block: &[u8], table: &mut Table, out: &mut Vec<u8>) -> Result<usize, Malformed> {
    let mut r = Reader { buf: block, pos: 0 };
    let mut rewritten = 0;
    let mut value = Vec::new();
    while r.pos < block.len() {
        let start = r.pos;
        let first = block[start];
        let (prefix, indexing) = if first & 0x80 != 0 {
            // Indexed field: refers to an entry, changes nothing.
            table.name(r.int(7)?)?;
            out.extend_from_slice(&block[start..r.pos]);
            continue;
        } else if first & 0x40 != 0 {
            (6, true)
        } else if first & 0x20 != 0 {
            let max = r.int(5)?;
            table.set_max(max)?;
            out.extend_from_slice(&block[start..r.pos]);
            continue;
        } else {
            // Literal without indexing (0000) or never indexed (0001).
            (4, false)
        };
        let index = r.int(prefix)?;
        let (authority, name_len) = if index == 0 {
            value.clear();
            r.string(&mut value)?;
            (value == b":authority", value.len())
        } else {
            table.name(index)?
        };
        let value_start = r.pos;
        value.clear();
        r.string(&mut value)?;
        if authority && !acceptable(&value) && !value.is_empty() {
            out.extend_from_slice(&block[start..value_start]);
            write_raw_string(&sanitize(&value), out);
            rewritten += 1;
        } else {
            out.extend_from_slice(&block[start..r.pos]);
        }
        if indexing {
            table.insert(Entry {
                authority,
                name_len,
                size: name_len + value.len() + 32,
            });
        }
    }
    Ok(rewritten)
}

/// Whether h2 takes `value` as an `:authority` (it parses it as an `http::uri::Authority`).
pub fn acceptable(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The same length, with every octet outside `[A-Za-z0-9.-]` replaced by `-`: a valid host
/// name for h2, and still recognisable (`tmp%2Fkms.sock` becomes `tmp-2Fkms.sock`).
pub fn sanitize(value: &[u8]) -> Vec<u8> {
    value
        .iter()
        .map(|&b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' => b,
            _ => b'-',
        })
        .collect()
}

/// An HPACK string, not Huffman-coded.
fn write_raw_string(s: &[u8], out: &mut Vec<u8>) {
    write_int(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

/// An HPACK integer with an `n`-bit prefix, the other bits of the first octet being `flags`.
pub fn write_int(mut v: usize, n: u32, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, Malformed> {
        let b = *self.buf.get(self.pos).ok_or(Malformed("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    /// RFC 7541 §5.1, refusing values over [`MAX_INT`].
    pub(super) fn int(&mut self, n: u32) -> Result<usize, Malformed> {
        let max = (1usize << n) - 1;
        let mut v = usize::from(self.byte()?) & max;
        if v < max {
            return Ok(v);
        }
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift > 21 {
                return Err(Malformed("integer too long"));
            }
            v += usize::from(b & 0x7f) << shift;
            if v > MAX_INT {
                return Err(Malformed("integer too large"));
            }
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
        }
    }

    /// RFC 7541 §5.2: appends the decoded string to `out`.
    pub(super) fn string(&mut self, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let huffman = self.buf.get(self.pos).ok_or(Malformed("truncated"))? & 0x80 != 0;
        let len = self.int(7)?;
        let end = self.pos.checked_add(len).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(Malformed("string past the block"))?;
        let raw = &self.buf[self.pos..end];
        self.pos = end;
        if huffman {
            huffman::decode(raw, out).map_err(|_| Malformed("bad Huffman string"))
        } else {
            out.extend_from_slice(raw);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(flags: u8, prefix: u32, index: usize, name: &[u8], value: &[u8], huffman: bool) -> Vec<u8> {
        let mut out = Vec::new();
        write_int(index, prefix, flags, &mut out);
        for (i, s) in [name, value].into_iter().enumerate() {
            if i == 0 && index != 0 {
                continue;
            }
            if huffman {
                let h = huffman::encode(s);
                write_int(h.len(), 7, 0x80, &mut out);
                out.extend_from_slice(&h);
            } else {
                write_raw_string(s, &mut out);
            }
        }
        out
    }

    /// Decodes a block's literal values in order (test helper; raw strings only).
    fn values(block: &[u8]) -> Vec<Vec<u8>> {
        let mut table = Table::default();
        let mut out = Vec::new();
        rewrite(block, &mut table, &mut out).unwrap();
        let mut r = Reader { buf: &out, pos: 0 };
        let mut vals = Vec::new();
        while r.pos < out.len() {
            let first = out[r.pos];
            if first & 0x80 != 0 {
                r.int(7).unwrap();
                continue;
            }
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            if r.int(prefix).unwrap() == 0 {
                r.string(&mut Vec::new()).unwrap();
            }
            let mut v = Vec::new();
            r.string(&mut v).unwrap();
            vals.push(v);
        }
        vals
    }

    const GRPCIO: &[u8] = b"tmp%2Fgrpcio-probe%2Fx.sock";

    #[test]
    fn a_percent_encoded_path_becomes_a_host_name_of_the_same_length() {
        assert!(!acceptable(GRPCIO));
        let fixed = sanitize(GRPCIO);
        assert_eq!(fixed, b"tmp-2Fgrpcio-probe-2Fx.sock");
        assert!(acceptable(&fixed));
        // Every form grpcio and others could use: new name, static name, never indexed, Huffman.
        for huffman in [false, true] {
            for block in [
                literal(0x40, 6, 0, b":authority", GRPCIO, huffman),
                literal(0x40, 6, 1, b"", GRPCIO, huffman),
                literal(0x00, 4, 1, b"", GRPCIO, huffman),
                literal(0x10, 4, 0, b":authority", GRPCIO, huffman),
            ] {
                assert_eq!(values(&block), vec![fixed.clone()]);
            }
        }
    }

    #[test]
    fn acceptable_authorities_and_other_fields_are_copied_byte_for_byte() {
        let mut block = literal(0x40, 6, 1, b"", b"localhost", true);
        block.extend(literal(0x40, 6, 0, b"x-path", GRPCIO, false));
        block.extend(literal(0x00, 4, 4, b"", b"/v2.KeyManagementService/Status", true));
        block.push(0x80 | 62); // the x-path entry
        let mut out = Vec::new();
        assert_eq!(rewrite(&block, &mut Table::default(), &mut out), Ok(0));
        assert_eq!(out, block);
    }

    #[test]
    fn a_dynamic_authority_name_is_followed() {
        // Literal with incremental indexing of a good authority, then a literal whose name is
        // that dynamic entry (index 62) and whose value is bad.
        let mut block = literal(0x40, 6, 0, b":authority", b"localhost", false);
        block.extend(literal(0x00, 4, 62, b"", GRPCIO, false));
        assert_eq!(values(&block), vec![b"localhost".to_vec(), sanitize(GRPCIO)]);
    }

    #[test]
    fn the_mirror_evicts_as_the_decoder_does() {
        let mut t = Table::default();
        // 32 + 10 + 27 = 69 bytes each: 59 fit in 4096.
        for _ in 0..100 {
            t.insert(Entry {
                authority: true,
                name_len: 10,
                size: 69,
            });
        }
        assert_eq!(t.entries.len(), 4096 / 69);
        t.set_max(100).unwrap();
        assert_eq!(t.entries.len(), 1);
        t.set_max(0).unwrap();
        assert_eq!((t.entries.len(), t.size), (0, 0));
        assert!(t.set_max(MAX_TABLE_SIZE + 1).is_err());
        // An entry larger than the table empties it.
        t.set_max(50).unwrap();
        t.insert(Entry {
            authority: false,
            name_len: 1,
            size: 51,
        });
        assert_eq!(t.entries.len(), 0);
    }

    #[test]
    fn integers_round_trip_and_huge_ones_are_refused() {
        for v in [0, 1, 30, 31, 62, 63, 127, 128, 1337, 4096, MAX_INT] {
            for n in [4, 5, 6, 7] {
                let mut out = Vec::new();
                write_int(v, n, 0, &mut out);
                assert_eq!(Reader { buf: &out, pos: 0 }.int(n), Ok(v));
            }
        }
        let huge = [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(Reader { buf: &huge, pos: 0 }.int(7).is_err());
        let long_zero = [0x7f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00];
        assert!(
            Reader {
                buf: &long_zero,
                pos: 0
            }
            .int(7)
            .is_err()
        );
    }

    #[test]
    fn random_and_truncated_blocks_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut good = literal(0x40, 6, 0, b":authority", GRPCIO, true);
        good.extend(literal(0x40, 6, 4, b"", b"/v2.KeyManagementService/Status", false));
        good.push(0x80 | 62);
        for i in 0..5000 {
            let block: Vec<u8> = if i % 2 == 0 {
                (0..next() % 64).map(|_| next() as u8).collect()
            } else {
                // A good block, truncated and with one octet flipped.
                let mut b = good[..(next() as usize % (good.len() + 1))].to_vec();
                if !b.is_empty() {
                    let at = next() as usize % b.len();
                    b[at] ^= next() as u8;
                }
                b
            };
            let mut table = Table::default();
            let mut out = Vec::new();
            let _ = rewrite(&block, &mut table, &mut out);
            assert!(table.size <= MAX_TABLE_SIZE);
        }
    }
}

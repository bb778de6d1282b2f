//! The server's header blocks, decoded just enough to see each response's `:status`. h2
//! answers a request whose headers are over the size limit with its own `431` response, which
//! no handler sees; every other response is tonic's `200`.
//!
//! The server's HPACK encoder has its own dynamic table; it is mirrored here with values (only
//! what the server sent, bounded by [`MAX_TABLE_SIZE`]).

use std::collections::VecDeque;

use super::hpack::{Malformed, Reader, STATIC_NAMES};

/// The largest encoder table followed; the client's SETTINGS may allow more, but a server that
/// sends a handful of short headers never needs it.
pub const MAX_TABLE_SIZE: usize = 64 * 1024;
/// Static entries 8 to 14 are `:status` with these values.
const STATIC_STATUS: [&[u8]; 7] = [b"200", b"204", b"206", b"304", b"400", b"404", b"500"];

/// The encoder's dynamic table, newest first.
pub struct Table {
    entries: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max: 4096,
        }
    }
}

impl Table {
    /// (name, value) at HPACK `index`; a static entry's value only for `:status`.
    fn get(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), Malformed> {
        match index {
            0 => Err(Malformed("index 0")),
            1..=61 => {
                let value = index
                    .checked_sub(8)
                    .and_then(|i| STATIC_STATUS.get(i))
                    .copied()
                    .unwrap_or(b"");
                Ok((STATIC_NAMES[index - 1].as_bytes().to_vec(), value.to_vec()))
            }
            _ => self
                .entries
                .get(index - 62)
                .cloned()
                .ok_or(Malformed("index past the table")),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        self.evict_to(self.max.saturating_sub(size));
        if size <= self.max {
            self.size += size;
            self.entries.push_front((name, value));
        }
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.entries.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }
}

/// The `:status` in `block`, if any; keeps `table` in step with the encoder.
pub fn status(block: &[u8], table: &mut Table) -> Result<Option<Vec<u8>>, Malformed> {
    let mut r = Reader { buf: block, pos: 0 };
    let mut status = None;
    while r.pos < block.len() {
        let first = block[r.pos];
        let (name, value) = if first & 0x80 != 0 {
            table.get(r.int(7)?)?
        } else if first & 0x20 != 0 && first & 0x40 == 0 {
            let max = r.int(5)?;
            if max > MAX_TABLE_SIZE {
                return Err(Malformed("encoder table over the limit"));
            }
            table.max = max;
            table.evict_to(max);
            continue;
        } else {
            let indexing = first & 0x40 != 0;
            let index = r.int(if indexing { 6 } else { 4 })?;
            let name = match index {
                0 => {
                    let mut name = Vec::new();
                    r.string(&mut name)?;
                    name
                }
                _ => table.get(index)?.0,
            };
            let mut value = Vec::new();
            r.string(&mut value)?;
            if indexing {
                table.insert(name.clone(), value.clone());
            }
            (name, value)
        };
        if name == b":status" {
            status = Some(value);
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::super::hpack::write_int;
    use super::*;

    #[test]
    fn statuses_static_literal_and_dynamic() {
        let mut t = Table::default();
        assert_eq!(status(&[0x88], &mut t), Ok(Some(b"200".to_vec())));
        // h2's 431: literal with incremental indexing, name :status (8); then the same, indexed.
        assert_eq!(status(&[0x48, 3, b'4', b'3', b'1'], &mut t), Ok(Some(b"431".to_vec())));
        assert_eq!(status(&[0x80 | 62], &mut t), Ok(Some(b"431".to_vec())));
        // Trailers: no :status.
        let mut trailers = vec![0x40, 11];
        trailers.extend_from_slice(b"grpc-status");
        trailers.extend_from_slice(&[1, b'0']);
        assert_eq!(status(&trailers, &mut t), Ok(None));
        // Huffman-coded value, and a size update that empties the table.
        let mut b = vec![0x20, 0x08];
        let coded = super::super::huffman::encode(b"431");
        write_int(coded.len(), 7, 0x80, &mut b);
        b.extend(coded);
        assert_eq!(status(&b, &mut t), Ok(Some(b"431".to_vec())));
        assert!(status(&[0x80 | 62], &mut t).is_err());
    }

    #[test]
    fn random_blocks_never_panic_and_stay_bounded() {
        let mut seed = 0xdead_beef_cafe_f00du64;
        let mut t = Table::default();
        for _ in 0..5000 {
            let block: Vec<u8> = (0..seed % 40)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = status(&block, &mut t);
            assert!(t.size <= MAX_TABLE_SIZE);
        }
    }
}

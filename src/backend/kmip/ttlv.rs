//! KMIP's TTLV encoding (OASIS KMIP 1.x, section 9.1): every item is a 3-byte tag, a 1-byte
//! type, a 4-byte big-endian length and the value, padded to a multiple of 8 bytes. Only the
//! types this backend sends or reads are supported; anything else decodes as [`Value::Other`].
//! Decoding is bounded and never panics on hostile input.

/// Tags used by this backend (KMIP 1.2, as in PyKMIP's `kmip.core.enums.Tags`).
pub mod tag {
    pub const ATTRIBUTE: u32 = 0x420008;
    pub const ATTRIBUTE_NAME: u32 = 0x42000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
    pub const AUTHENTICATION: u32 = 0x42000C;
    pub const BATCH_COUNT: u32 = 0x42000D;
    pub const BATCH_ITEM: u32 = 0x42000F;
    pub const BLOCK_CIPHER_MODE: u32 = 0x420011;
    pub const CREDENTIAL: u32 = 0x420023;
    pub const CREDENTIAL_TYPE: u32 = 0x420024;
    pub const CREDENTIAL_VALUE: u32 = 0x420025;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
    pub const IV_COUNTER_NONCE: u32 = 0x42003D;
    pub const MAXIMUM_ITEMS: u32 = 0x42004F;
    pub const NAME: u32 = 0x420053;
    pub const NAME_TYPE: u32 = 0x420054;
    pub const NAME_VALUE: u32 = 0x420055;
    pub const OPERATION: u32 = 0x42005C;
    pub const PASSWORD: u32 = 0x4200A1;
    pub const PROTOCOL_VERSION: u32 = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
    pub const REQUEST_HEADER: u32 = 0x420077;
    pub const REQUEST_MESSAGE: u32 = 0x420078;
    pub const REQUEST_PAYLOAD: u32 = 0x420079;
    pub const RESPONSE_MESSAGE: u32 = 0x42007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
    pub const RESULT_MESSAGE: u32 = 0x42007D;
    pub const RESULT_REASON: u32 = 0x42007E;
    pub const RESULT_STATUS: u32 = 0x42007F;
    pub const STATE: u32 = 0x42008D;
    pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
    pub const USERNAME: u32 = 0x420099;
    pub const DATA: u32 = 0x4200C2;
    pub const TAG_LENGTH: u32 = 0x4200CE;
    pub const AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA: u32 = 0x4200FE;
    pub const AUTHENTICATED_ENCRYPTION_TAG: u32 = 0x4200FF;
}

/// A decoded or to-be-encoded value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Structure(Vec<Item>),
    Integer(i32),
    LongInteger(i64),
    Enumeration(u32),
    Boolean(bool),
    Text(String),
    Bytes(Vec<u8>),
    DateTime(i64),
    /// A type this backend does not use (BigInteger, Interval …), kept raw.
    Other(u8, Vec<u8>),
}

/// One TTLV item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub tag: u32,
    pub value: Value,
}

/// Largest message this backend reads.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest structure nesting accepted.
const MAX_DEPTH: usize = 16;

impl Item {
    pub fn new(tag: u32, value: Value) -> Self {
        Self { tag, value }
    }

    pub fn structure(tag: u32, items: Vec<Item>) -> Self {
        Self::new(tag, Value::Structure(items))
    }

    /// The first direct child with `tag`.
    pub fn child(&self, tag: u32) -> Option<&Item> {
        match &self.value {
            Value::Structure(items) => items.iter().find(|i| i.tag == tag),
            _ => None,
        }
    }

    /// Every direct child with `tag`.
    pub fn children(&self, tag: u32) -> impl Iterator<Item = &Item> {
        let items: &[Item] = match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        };
        items.iter().filter(move |i| i.tag == tag)
    }

    pub fn as_enum(&self) -> Option<u32> {
        match self.value {
            Value::Enumeration(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_datetime(&self) -> Option<i64> {
        match self.value {
            Value::DateTime(t) => Some(t),
            _ => None,
        }
    }

    /// Appends the encoding of this item to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        let (kind, body): (u8, Vec<u8>) = match &self.value {
            Value::Structure(items) => {
                let mut body = Vec::new();
                for item in items {
                    item.encode(&mut body);
                }
                (0x01, body)
            }
            Value::Integer(v) => (0x02, v.to_be_bytes().to_vec()),
            Value::LongInteger(v) => (0x03, v.to_be_bytes().to_vec()),
            Value::Enumeration(v) => (0x05, v.to_be_bytes().to_vec()),
            Value::Boolean(v) => (0x06, u64::from(*v).to_be_bytes().to_vec()),
            Value::Text(s) => (0x07, s.as_bytes().to_vec()),
            Value::Bytes(b) => (0x08, b.clone()),
            Value::DateTime(t) => (0x09, t.to_be_bytes().to_vec()),
            Value::Other(kind, raw) => (*kind, raw.clone()),
        };
        out.push(kind);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out.resize(out.len() + (8 - body.len() % 8) % 8, 0);
    }

    /// Decodes exactly one item filling `buf`.
    pub fn decode(buf: &[u8]) -> Result<Item, String> {
        let (item, used) = decode_one(buf, 0)?;
        if used != buf.len() {
            return Err(format!("{} trailing bytes after the message", buf.len() - used));
        }
        Ok(item)
    }
}

/// The length of the message whose 8-byte header is `header` (value and padding included).
pub fn message_len(header: &[u8; 8]) -> Result<usize, String> {
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let total = 8 + len.div_ceil(8) * 8;
    if total > MAX_MESSAGE {
        return Err(format!(
            "KMIP message of {total} bytes is over the {MAX_MESSAGE}-byte limit"
        ));
    }
    Ok(total)
}

fn decode_one(buf: &[u8], depth: usize) -> Result<(Item, usize), String> {
    if depth > MAX_DEPTH {
        return Err("TTLV nested too deeply".into());
    }
    if buf.len() < 8 {
        return Err("truncated TTLV header".into());
    }
    let tag = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
    let kind = buf[3];
    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    let padded = len.div_ceil(8).checked_mul(8).ok_or("TTLV length overflows")?;
    let body = buf.get(8..8 + len).ok_or("truncated TTLV value")?;
    let used = 8 + padded;
    if buf.len() < used {
        return Err("truncated TTLV padding".into());
    }
    let fixed = |n: usize| -> Result<[u8; 8], String> {
        if len != n {
            return Err(format!("TTLV type {kind:#04x} with length {len}"));
        }
        let mut b = [0u8; 8];
        b[8 - n..].copy_from_slice(body);
        Ok(b)
    };
    let value = match kind {
        0x01 => {
            let mut items = Vec::new();
            let mut at = 0;
            while at < body.len() {
                let (item, n) = decode_one(&body[at..], depth + 1)?;
                items.push(item);
                at += n;
            }
            Value::Structure(items)
        }
        0x02 => Value::Integer(i64::from_be_bytes(fixed(4)?) as i32),
        0x03 => Value::LongInteger(i64::from_be_bytes(fixed(8)?)),
        0x05 => Value::Enumeration(u64::from_be_bytes(fixed(4)?) as u32),
        0x06 => Value::Boolean(u64::from_be_bytes(fixed(8)?) != 0),
        0x07 => Value::Text(String::from_utf8(body.to_vec()).map_err(|_| "TTLV text is not UTF-8")?),
        0x08 => Value::Bytes(body.to_vec()),
        0x09 => Value::DateTime(i64::from_be_bytes(fixed(8)?)),
        other => Value::Other(other, body.to_vec()),
    };
    Ok((Item { tag, value }, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads() {
        let msg = Item::structure(
            tag::REQUEST_MESSAGE,
            vec![
                Item::new(tag::BATCH_COUNT, Value::Integer(1)),
                Item::new(tag::OPERATION, Value::Enumeration(0x1F)),
                Item::new(tag::UNIQUE_IDENTIFIER, Value::Text("abc".into())),
                Item::new(tag::DATA, Value::Bytes(vec![1, 2, 3, 4, 5, 6, 7, 8, 9])),
                Item::new(tag::STATE, Value::LongInteger(-2)),
                Item::new(tag::NAME, Value::Boolean(true)),
                Item::new(tag::ATTRIBUTE, Value::DateTime(1_700_000_000)),
            ],
        );
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out.len() % 8, 0);
        assert_eq!(&out[..4], &[0x42, 0x00, 0x78, 0x01]);
        let header: [u8; 8] = out[..8].try_into().unwrap();
        assert_eq!(message_len(&header).unwrap(), out.len());
        assert_eq!(Item::decode(&out).unwrap(), msg);
        // An Integer is 4 bytes of value and 4 of padding (KMIP 1.2 §9.1.1.4, example).
        let mut int = Vec::new();
        Item::new(0x420020, Value::Integer(8)).encode(&mut int);
        assert_eq!(int, [0x42, 0x00, 0x20, 0x02, 0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0, 0]);
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        let mut good = Vec::new();
        Item::structure(
            tag::RESPONSE_MESSAGE,
            vec![Item::new(tag::DATA, Value::Bytes(vec![7; 20]))],
        )
        .encode(&mut good);
        for cut in 0..good.len() {
            assert!(Item::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = good.clone();
        lying[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Item::decode(&lying).is_err());
        assert!(message_len(&lying[..8].try_into().unwrap()).is_err());
        // Deep nesting.
        let mut deep = Item::new(tag::DATA, Value::Integer(1));
        for _ in 0..40 {
            deep = Item::structure(tag::ATTRIBUTE, vec![deep]);
        }
        let mut buf = Vec::new();
        deep.encode(&mut buf);
        assert!(Item::decode(&buf).is_err());
        // A wrong fixed length.
        let bad = [0x42, 0x00, 0x0D, 0x02, 0, 0, 0, 3, 1, 2, 3, 0, 0, 0, 0, 0];
        assert!(Item::decode(&bad).is_err());
    }
}

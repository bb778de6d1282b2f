//! How the report shows strings that come from etcd (keys, key_ids, provider and resource
//! names): at most [`SHOWN`] bytes wide and with control characters escaped, so a hostile
//! value can neither flood the output nor forge lines or terminal escapes. Aggregation keeps
//! the full values; only the renderings (table, JSON, error messages) go through [`shown`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use ring::digest;
use serde::{Serialize, Serializer};

/// Bytes of a value's shown form (escapes included) before it is cut.
pub const SHOWN: usize = 256;

/// Characters shown as `\u{…}`: C0/C1 controls and DEL (newlines, terminal escapes), the
/// separators, bidirectional and zero-width controls that make a terminal break, reorder or
/// hide part of a line, and the backslash itself, so that no two values are shown alike (a
/// JSON map would merge them).
fn escaped(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\\' | '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// `s` fit for a terminal or a JSON document: unchanged when short and printable; otherwise
/// escaped, and if that is wider than [`SHOWN`] bytes, its first characters up to that width
/// then `…(<whole length> bytes, sha256:<16 hex>)` (the start of the whole value's digest, so
/// two long values that begin alike stay two distinct rows and JSON keys).
pub fn shown(s: &str) -> Cow<'_, str> {
    if s.len() <= SHOWN && !s.chars().any(escaped) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(SHOWN + 64);
    let mut piece = String::new();
    for c in s.chars() {
        piece.clear();
        if escaped(c) {
            let _ = write!(piece, "{}", c.escape_unicode());
        } else {
            piece.push(c);
        }
        if out.len() + piece.len() > SHOWN {
            let d = digest::digest(&digest::SHA256, s.as_bytes());
            let _ = write!(
                out,
                "…({} bytes, sha256:{})",
                thousands(s.len()),
                hex::encode(&d.as_ref()[..8])
            );
            break;
        }
        out.push_str(&piece);
    }
    Cow::Owned(out)
}

/// [`shown`] for bytes (etcd keys), read as UTF-8 with replacement characters.
pub fn shown_bytes(b: &[u8]) -> String {
    shown(&String::from_utf8_lossy(b)).into_owned()
}

/// `99744` → `99,744`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `#[serde(serialize_with)]`: a string, [`shown`].
pub fn string<S: Serializer>(s: &str, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&shown(s))
}

/// Serializes an optional string as [`shown`].
pub fn option<S: Serializer>(s: &Option<String>, ser: S) -> Result<S::Ok, S::Error> {
    match s {
        Some(s) => ser.serialize_some(&shown(s)),
        None => ser.serialize_none(),
    }
}

/// `#[serde(serialize_with)]`: every string of a list or set, [`shown`].
pub fn list<'a, S: Serializer, L>(l: &'a L, ser: S) -> Result<S::Ok, S::Error>
where
    &'a L: IntoIterator<Item = &'a String>,
{
    ser.collect_seq(l.into_iter().map(|s| shown(s)))
}

/// `#[serde(serialize_with)]`: a map with its keys [`shown`].
pub fn keys<S: Serializer, V: Serialize>(m: &BTreeMap<String, V>, ser: S) -> Result<S::Ok, S::Error> {
    ser.collect_map(m.iter().map(|(k, v)| (shown(k), v)))
}

/// `#[serde(serialize_with)]`: a map of maps with the keys of both [`shown`].
pub fn keys2<S: Serializer, V: Serialize>(
    m: &BTreeMap<String, BTreeMap<String, V>>,
    ser: S,
) -> Result<S::Ok, S::Error> {
    ser.collect_map(m.iter().map(|(k, inner)| (shown(k), Keys(inner))))
}

struct Keys<'a, V>(&'a BTreeMap<String, V>);

impl<V: Serialize> Serialize for Keys<'_, V> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        keys(self.0, ser)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_printable_values_are_unchanged() {
        assert!(matches!(shown("/registry/secrets/a"), Cow::Borrowed(_)));
        assert!(matches!(shown("ключ-é"), Cow::Borrowed(_)));
        assert!(matches!(shown(""), Cow::Borrowed("")));
        let full = "a".repeat(SHOWN);
        assert!(matches!(shown(&full), Cow::Borrowed(_)));
    }

    #[test]
    fn long_values_are_cut_with_their_length_and_digest() {
        let long = "a".repeat(100_000);
        let s = shown(&long);
        let digest = hex::encode(&digest::digest(&digest::SHA256, long.as_bytes()).as_ref()[..8]);
        assert_eq!(s, format!("{}…(100,000 bytes, sha256:{digest})", "a".repeat(SHOWN)));
        // One byte over the width is cut.
        let over = "a".repeat(SHOWN + 1);
        assert!(shown(&over).starts_with(&format!("{}…(257 bytes, sha256:", "a".repeat(SHOWN))));
        let mut other = long.clone();
        other.push('b');
        assert_ne!(shown(&other), s, "values that begin alike stay distinct");
        // Cut on a character boundary.
        let wide = "é".repeat(200);
        assert!(shown(&wide).starts_with(&format!("{}…(400 bytes", "é".repeat(128))));
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn escapes_count_toward_the_width() {
        // 100 bytes, 600 once escaped: cut, never wider than SHOWN plus the marker.
        let escapes = "\x1b".repeat(100);
        let s = shown(&escapes);
        assert_eq!(s.split('…').next().unwrap(), r"\u{1b}".repeat(SHOWN / 6));
        assert!(s.contains("…(100 bytes, sha256:"), "{s}");
        let newlines = "\n".repeat(1_000_000);
        let s = shown(&newlines);
        assert!(s.len() <= SHOWN + 48 && !s.contains('\n'), "{s}");
        assert!(s.contains("…(1,000,000 bytes, sha256:"), "{s}");
    }

    #[test]
    fn controls_are_escaped() {
        assert_eq!(shown("a\nb\x1b[2J\u{9b}\u{202e}"), "a\\u{a}b\\u{1b}[2J\\u{9b}\\u{202e}");
        assert_eq!(shown("\r\u{7f}\u{85}\u{2028}"), "\\u{d}\\u{7f}\\u{85}\\u{2028}");
        assert_eq!(
            shown("a\u{200b}\u{061c}\u{2066}\u{feff}"),
            "a\\u{200b}\\u{61c}\\u{2066}\\u{feff}"
        );
        assert_eq!(shown_bytes(b"k\0\xff"), "k\\u{0}\u{fffd}");
        // A literal `\u{a}` is not shown as a newline would be.
        assert_ne!(shown("a\\u{a}"), shown("a\n"));
        assert_eq!(shown("a\\b"), "a\\u{5c}b");
    }

    #[test]
    fn a_value_spelling_a_cut_form_is_not_shown_as_one() {
        for long in ["a".repeat(1_000), "\n".repeat(1_000)] {
            let cut = shown(&long).into_owned();
            assert_ne!(shown(&cut), cut);
        }
    }

    #[derive(Serialize)]
    struct Doc {
        #[serde(serialize_with = "string")]
        one: String,
        #[serde(serialize_with = "list")]
        many: std::collections::BTreeSet<String>,
        #[serde(serialize_with = "keys")]
        map: BTreeMap<String, u64>,
        #[serde(serialize_with = "keys2")]
        nested: BTreeMap<String, BTreeMap<String, u64>>,
    }

    #[test]
    fn serde_helpers_show_every_string_from_etcd() {
        let long = "k".repeat(1_000);
        let doc = Doc {
            one: "a\nb".into(),
            many: ["x\ry".to_string(), long.clone()].into(),
            map: [("m\x1b".to_string(), 1)].into(),
            nested: [("p\n".to_string(), [(long.clone(), 2)].into())].into(),
        };
        let json: serde_json::Value = serde_json::to_value(&doc).unwrap();
        let cut = shown(&long).into_owned();
        assert_eq!(
            json,
            serde_json::json!({
                "one": "a\\u{a}b",
                "many": [cut.clone(), "x\\u{d}y"],
                "map": {"m\\u{1b}": 1},
                "nested": {"p\\u{a}": {cut: 2}},
            })
        );
    }
}

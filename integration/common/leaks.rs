//! Finding secrets in logs, in every form a log line might spell them.

use std::collections::HashMap;

/// Panics naming the form if any of `secrets` (each at least 16 bytes) appears in `logs`.
pub fn assert_no_leaks(logs: &str, secrets: &[Vec<u8>]) {
    // The encoder must be right, or the base64 searches find nothing whatever the logs say.
    assert_eq!(base64(b"foob", STANDARD, true), "Zm9vYg==");
    assert_eq!(base64(&[0xfb, 0xff], URL_SAFE, false), "-_8");
    assert!(
        secrets.iter().all(|s| s.len() >= 16),
        "search for secrets of 16 bytes or more"
    );
    let forms: Vec<_> = secrets.iter().flat_map(|s| leak_forms(s)).collect();
    if let Some((form, text)) = find_any(logs, &forms) {
        panic!("secret bytes in logs as {form}: {text}");
    }
}

/// The first of `needles` found in `haystack`, in one pass over it. Searching for each of the
/// ~5,000 needles in turn through half a megabyte of log takes seconds in a test build.
pub fn find_any<'a>(haystack: &str, needles: &'a [(&str, String)]) -> Option<&'a (&'a str, String)> {
    const PREFIX: usize = 16; // no form of a 16-byte piece, nor the prefix forms, is shorter
    let mut by_prefix: HashMap<&[u8], Vec<&(&str, String)>> = HashMap::new();
    for needle in needles {
        by_prefix
            .entry(&needle.1.as_bytes()[..PREFIX])
            .or_default()
            .push(needle);
    }
    let hay = haystack.as_bytes();
    hay.windows(PREFIX).enumerate().find_map(|(at, window)| {
        let candidates = by_prefix.get(window)?;
        candidates
            .iter()
            .find(|n| hay[at..].starts_with(n.1.as_bytes()))
            .copied()
    })
}

/// Every way a log line might spell `secret`, as (name of the form, text to search for): the
/// whole secret and, since a line could carry a slice of it, each of its 16-byte windows, in hex,
/// base64 and the `Debug` forms of byte buffers.
pub fn leak_forms(secret: &[u8]) -> Vec<(&'static str, String)> {
    // Debug output without its delimiters (`b"…"`, `"…"`, `[…]`), so a slice inside a longer
    // print still matches.
    fn inner(debug: String, open: usize) -> String {
        debug[open..debug.len() - 1].to_string()
    }
    // Prefixes shorter than a window: a line carrying just the first bytes.
    let mut forms = vec![
        ("hex of the first 12 bytes", hex::encode(&secret[..12])),
        ("upper-case hex of the first 12 bytes", hex::encode_upper(&secret[..12])),
        (
            "byte list of the first 8 bytes",
            inner(format!("{:?}", &secret[..8]), 0),
        ),
    ];
    for piece in std::iter::once(secret).chain(secret.windows(16)) {
        forms.extend([
            ("hex", hex::encode(piece)),
            ("upper-case hex", hex::encode_upper(piece)),
            ("base64", base64(piece, STANDARD, true)),
            ("unpadded base64", base64(piece, STANDARD, false)),
            ("URL-safe base64", base64(piece, URL_SAFE, true)),
            ("unpadded URL-safe base64", base64(piece, URL_SAFE, false)),
            // `{:?}` of bytes::Bytes: printable ASCII as is, the rest `\xNN`, `\0`, `\n` ….
            (
                "Bytes Debug",
                inner(format!("{:?}", bytes::Bytes::copy_from_slice(piece)), 2),
            ),
            // std's byte escaping (`escape_ascii`, as b"…" literals print): `\xNN`, `\'` ….
            ("escaped bytes", piece.escape_ascii().to_string()),
            // `{:?}` of String::from_utf8_lossy: U+FFFD for invalid UTF-8, `\u{…}` escapes.
            (
                "lossy UTF-8 Debug",
                inner(format!("{:?}", String::from_utf8_lossy(piece)), 1),
            ),
            // `{:?}` of &[u8] / Vec<u8>: `[12, 200, 3]`.
            ("byte list", inner(format!("{piece:?}"), 1)),
        ]);
    }
    forms
}

pub const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
pub const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// RFC 4648 base64 in `alphabet`, with or without `=` padding. Written here because no base64
/// crate is a direct dependency.
pub fn base64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let bits = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        // k input bytes make k + 1 characters of 6 bits each.
        for i in 0..=chunk.len() {
            out.push(alphabet[((bits >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if pad {
            out.extend(std::iter::repeat_n('=', 3 - chunk.len()));
        }
    }
    out
}

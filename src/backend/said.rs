//! What the service said, made safe to log: a server (or anything answering in its place) could
//! echo a request, so what we sent is cut out in every encoding the SDK or a server would use,
//! control characters become spaces, and the text is bounded.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

/// Longest message kept, in characters.
const MAX: usize = 240;

pub fn said(message: &str, sent: &[&[u8]]) -> String {
    let mut text = message.to_string();
    for secret in sent.iter().filter(|s| s.len() >= 8) {
        let forms = [
            STANDARD.encode(secret),
            STANDARD_NO_PAD.encode(secret),
            URL_SAFE.encode(secret),
            URL_SAFE_NO_PAD.encode(secret),
            hex::encode(secret),
            hex::encode_upper(secret),
        ];
        for form in forms {
            text = text.replace(&form, "<redacted>");
        }
    }
    let text: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_secrets_are_cut_out() {
        let kek = [7u8; 32];
        let echo = format!("bad request {} and {}", STANDARD.encode(kek), hex::encode(kek));
        let out = said(&echo, &[&kek]);
        assert_eq!(out, "bad request <redacted> and <redacted>");
    }

    #[test]
    fn control_characters_and_length_are_bounded() {
        let out = said(&format!("a\nb\x1b[31m{}", "x".repeat(1000)), &[]);
        assert!(out.starts_with("a b [31m"));
        assert!(out.chars().count() <= MAX + 1);
    }
}

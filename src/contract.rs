//! What kube-apiserver accepts from a KMS v2 plugin (../shared/kms-contract.md §2).
//!
//! The apiserver re-checks these limits on every read from etcd, so a response that breaks one
//! would make data unreadable: the plugin checks them when a KEK is made, before any Encrypt
//! can return it, and the tests check every response.

use std::collections::HashMap;

/// Longest ciphertext the apiserver accepts from Encrypt.
pub const MAX_CIPHERTEXT: usize = 1024;

/// The annotation that carries the wrapped local KEK. A fully-qualified key of this project.
pub const KEK_ANNOTATION: &str = "kek.kms-plugin.dev";
/// Longest key_id the apiserver accepts.
pub const MAX_KEY_ID: usize = 1024;
/// Largest sum of len(key) + len(value) over all annotations.
pub const MAX_ANNOTATIONS: usize = 32 * 1024;

/// Largest request the server decodes (and response it encodes); a bigger one is refused with
/// ResourceExhausted before it is buffered whole. The plugin's own limit, far below the
/// apiserver's: the largest request it can legitimately get is a Decrypt of its own output.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// The `uid` the apiserver sends with each call is a UUID (36 bytes); the budget allows this.
pub const MAX_UID: usize = 64;

/// Largest wrapped KEK the plugin makes or accepts: what still fits in a Decrypt request of the
/// longest ciphertext, uid and key_id under [`MAX_REQUEST_BYTES`]. A KEK is refused at creation
/// above it (and above its backend's own bound), so every Encrypt's output can be decrypted.
pub const MAX_WRAPPED_KEK: usize = MAX_REQUEST_BYTES - decrypt_request_len(MAX_KEY_ID, 0) - 2;

// The budget holds for the worst case, and leaves every backend room (they make 60-260 bytes).
const _: () = assert!(decrypt_request_len(MAX_KEY_ID, MAX_WRAPPED_KEK) <= MAX_REQUEST_BYTES);
const _: () = assert!(MAX_WRAPPED_KEK >= 1024);

/// Encoded size of a v2 DecryptRequest with the longest ciphertext and uid, a key_id of
/// `key_id` bytes and the KEK annotation holding `wrapped` bytes (protobuf: one tag byte and a
/// varint length per field; the annotation is one map entry).
pub const fn decrypt_request_len(key_id: usize, wrapped: usize) -> usize {
    let entry = field(KEK_ANNOTATION.len()) + field(wrapped);
    field(MAX_CIPHERTEXT) + field(MAX_UID) + field(key_id) + field(entry)
}

/// A length-delimited field of `len` bytes: tag, varint length, bytes.
const fn field(len: usize) -> usize {
    let mut varint = 1;
    let mut n = len >> 7;
    while n > 0 {
        varint += 1;
        n >>= 7;
    }
    1 + varint + len
}

/// A key_id the apiserver will take: non-empty and at most 1024 bytes.
pub fn check_key_id(key_id: &str) -> Result<(), String> {
    match key_id.len() {
        0 => Err("key_id is empty".into()),
        n if n > MAX_KEY_ID => Err(format!("key_id of {n} bytes exceeds {MAX_KEY_ID}")),
        _ => Ok(()),
    }
}

/// An annotation key the apiserver will take: a lowercase DNS-1123 subdomain with at least
/// two labels, each label at most 63 characters, the whole at most 253.
pub fn check_annotation_key(key: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("annotation key is not a fully qualified domain name: {why}"));
    if key.is_empty() || key.len() > 253 {
        return bad("length must be 1..=253");
    }
    let labels: Vec<&str> = key.split('.').collect();
    if labels.len() < 2 {
        return bad("needs at least two labels");
    }
    for label in labels {
        let b = label.as_bytes();
        if b.is_empty() || b.len() > 63 {
            return bad("each label must be 1..=63 characters");
        }
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if !alnum(&b[0]) || !alnum(&b[b.len() - 1]) || !b.iter().all(|c| alnum(c) || *c == b'-') {
            return bad("labels are lowercase letters, digits and inner '-'");
        }
    }
    Ok(())
}

/// A whole annotation map the apiserver will take.
pub fn check_annotations<V: AsRef<[u8]>>(annotations: &HashMap<String, V>) -> Result<(), String> {
    let mut total = 0usize;
    for (k, v) in annotations {
        check_annotation_key(k)?;
        total += k.len() + v.as_ref().len();
    }
    if total > MAX_ANNOTATIONS {
        return Err(format!("annotations total {total} bytes, over {MAX_ANNOTATIONS}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_keys() {
        for good in [
            KEK_ANNOTATION,
            "kek.example.io",
            "a.b",
            "x-1.y2.z",
            &format!("{}.io", "a".repeat(63)),
        ] {
            assert!(check_annotation_key(good).is_ok(), "{good}");
        }
        let long = format!("{}.io", vec!["a".repeat(63); 4].join("."));
        for bad in [
            "",
            "foo",
            "Foo.io",
            "-a.io",
            "a-.io",
            "a..io",
            ".a.io",
            "a.io.",
            "a_b.io",
            "a b.io",
            "ü.io",
            &format!("{}.io", "a".repeat(64)),
            &long,
        ] {
            assert!(check_annotation_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn annotation_totals_and_key_ids() {
        let mut m = HashMap::new();
        let fits = MAX_ANNOTATIONS - KEK_ANNOTATION.len();
        m.insert(KEK_ANNOTATION.to_string(), vec![0u8; fits]);
        assert!(check_annotations(&m).is_ok());
        m.insert(KEK_ANNOTATION.to_string(), vec![0u8; fits + 1]);
        assert!(check_annotations(&m).is_err());
        assert!(check_key_id("").is_err());
        assert!(check_key_id(&"k".repeat(1024)).is_ok());
        assert!(check_key_id(&"k".repeat(1025)).is_err());
    }

    #[test]
    fn the_largest_decrypt_request_fits_the_request_limit() {
        use prost::Message;
        let request = crate::proto::v2::DecryptRequest {
            ciphertext: vec![1; MAX_CIPHERTEXT].into(),
            uid: "u".repeat(MAX_UID),
            key_id: "k".repeat(MAX_KEY_ID),
            annotations: [(KEK_ANNOTATION.to_string(), vec![2u8; MAX_WRAPPED_KEK].into())].into(),
        };
        assert_eq!(request.encoded_len(), decrypt_request_len(MAX_KEY_ID, MAX_WRAPPED_KEK));
        assert!(request.encoded_len() <= MAX_REQUEST_BYTES);
        assert!(decrypt_request_len(MAX_KEY_ID, MAX_WRAPPED_KEK + 3) > MAX_REQUEST_BYTES);
    }
}

//! The key_id `--require-retirable` names, accepted in two exact forms only: a near miss (the
//! bare hex of a hash, upper case, a truncated hash, a stray space) would match nothing and
//! so read as "no objects: retirable", the one answer that destroys data when wrong.

use crate::logging::KeyIdHash;

/// What the operator asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// The plugin's own form (as `kms-plugin status` prints it).
    KeyId(String),
    /// `sha256:<64 lowercase hex>`, as the apiserver's metrics and logs show it.
    Hash(String),
}

impl Wanted {
    /// `sha256:<hex>` of the key_id.
    pub fn hash(&self) -> String {
        match self {
            Wanted::KeyId(id) => KeyIdHash(id).to_string(),
            Wanted::Hash(h) => h.clone(),
        }
    }

    /// Whether a stored key_id is this one.
    pub fn matches(&self, key_id: &str, key_id_hash: &str) -> bool {
        match self {
            Wanted::KeyId(id) => id == key_id,
            Wanted::Hash(h) => h == key_id_hash,
        }
    }
}

/// The accepted forms, for messages.
pub const FORMS: &str = "the plugin's key_id as `kms-plugin status` prints it (local:<32 hex>, pkcs11:<32 hex>, \
     kmip:<32 hex>, vault:<key>:v<N>:<8 hex>, or an AWS key ARN), or sha256: followed by 64 lowercase hex digits";

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses `--require-retirable`'s argument.
pub fn parse(arg: &str) -> Result<Wanted, String> {
    let refuse = || {
        format!(
            "--require-retirable {:?} is not a key_id this plugin writes; give {FORMS}",
            arg.chars().take(100).collect::<String>()
        )
    };
    if let Some(hex) = arg.strip_prefix("sha256:") {
        return match lower_hex(hex, 64) {
            true => Ok(Wanted::Hash(arg.to_string())),
            false => Err(refuse()),
        };
    }
    let plugin_form = if let Some(rest) = ["local:", "pkcs11:", "kmip:"].iter().find_map(|p| arg.strip_prefix(p)) {
        lower_hex(rest, 32)
    } else if let Some(rest) = arg.strip_prefix("vault:") {
        // vault:<key identity>:v<N>:<8 hex>; the identity may itself hold colons.
        let mut parts = rest.rsplitn(3, ':');
        let (tag, version, identity) = (parts.next(), parts.next(), parts.next());
        tag.is_some_and(|t| lower_hex(t, 8))
            && version
                .and_then(|v| v.strip_prefix('v'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            && identity.is_some_and(|i| !i.is_empty())
    } else if let Some(rest) = arg.strip_prefix("arn:") {
        // arn:<partition>:kms:<region>:<account>:key/<id>
        let parts: Vec<&str> = rest.split(':').collect();
        parts.len() == 5 && parts[1] == "kms" && parts[4].strip_prefix("key/").is_some_and(|k| !k.is_empty())
    } else {
        false
    };
    let clean = !arg.is_empty()
        && arg.len() <= crate::contract::MAX_KEY_ID
        && !arg.chars().any(|c| c.is_whitespace() || c.is_control());
    match plugin_form && clean {
        true => Ok(Wanted::KeyId(arg.to_string())),
        false => Err(refuse()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_two_forms_and_nothing_else() {
        let local = "local:0123456789abcdef0123456789abcdef";
        assert_eq!(parse(local).unwrap(), Wanted::KeyId(local.into()));
        assert!(parse("vault:k@mount:v12:deadbeef").is_ok());
        assert!(parse("arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab").is_ok());
        let hash = format!("sha256:{HEX64}");
        assert_eq!(parse(&hash).unwrap(), Wanted::Hash(hash.clone()));
        for bad in [
            HEX64.to_string(),
            format!("SHA256:{}", HEX64.to_uppercase()),
            format!("sha256:{}", HEX64.to_uppercase()),
            "sha256:deadbeef".to_string(),
            format!(" {local}"),
            format!("{local} "),
            "local:0123".to_string(),
            "vault:k:v:deadbeef".to_string(),
            "arn:aws:s3:::bucket".to_string(),
            "k1".to_string(),
            String::new(),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.contains("sha256: followed by 64"), "{bad:?}: {e}");
        }
    }
}

//! What kube-apiserver stores in etcd (contract §7), parsed from a value alone. Pure functions:
//! no I/O, no panics on any input (unit-tested with corrupt values, and fuzzable).

use std::collections::HashMap;

use prost::Message;

/// The apiserver's KMS v2 envelope (`k8s.io/apiserver/.../kmsv2/v2/api.proto`, package `v2`).
/// Defined here with prost's derive because it is one small message.
#[derive(Clone, PartialEq, Message)]
pub struct EncryptedObject {
    /// The object, sealed under a DEK derived from the seed.
    #[prost(bytes = "vec", tag = "1")]
    pub encrypted_data: Vec<u8>,
    /// The plugin's key_id when the seed was sealed.
    #[prost(string, tag = "2")]
    pub key_id: String,
    /// The plugin's Encrypt ciphertext (the sealed seed or DEK).
    #[prost(bytes = "vec", tag = "3")]
    pub encrypted_dek_source: Vec<u8>,
    /// The plugin's Encrypt annotations.
    #[prost(map = "string, bytes", tag = "4")]
    pub annotations: HashMap<String, Vec<u8>>,
    /// 0 = `AES_GCM_KEY`, 1 = `HKDF_SHA256_XNONCE_AES_GCM_SEED`.
    #[prost(int32, tag = "5")]
    pub encrypted_dek_source_type: i32,
}

/// The other encryption providers' formats, by the name the report uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OtherFormat {
    AesCbc,
    AesGcm,
    Secretbox,
    KmsV1,
}

impl OtherFormat {
    pub fn name(self) -> &'static str {
        match self {
            OtherFormat::AesCbc => "aescbc",
            OtherFormat::AesGcm => "aesgcm",
            OtherFormat::Secretbox => "secretbox",
            OtherFormat::KmsV1 => "kms:v1",
        }
    }
}

/// Identity (not encrypted) encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Identity {
    /// Kubernetes protobuf: `k8s\0` + `runtime.Unknown`.
    Protobuf,
    /// JSON, as custom resources are stored.
    Json,
}

impl Identity {
    pub fn name(self) -> &'static str {
        match self {
            Identity::Protobuf => "protobuf",
            Identity::Json => "json",
        }
    }
}

/// How one stored value was written.
#[derive(Debug, PartialEq)]
pub enum Stored {
    KmsV2 {
        provider: String,
        object: EncryptedObject,
    },
    Other(OtherFormat),
    Identity(Identity),
    /// Nothing above, or a KMS v2 value whose envelope does not decode: why, without the bytes.
    Unknown(&'static str),
}

const KMS_V2: &[u8] = b"k8s:enc:kms:v2:";

/// Classifies a value. Only the prefix and, for KMS v2, the envelope are read.
pub fn parse(value: &[u8]) -> Stored {
    if let Some(rest) = value.strip_prefix(KMS_V2) {
        return parse_kms_v2(rest);
    }
    let others: [(&[u8], OtherFormat); 4] = [
        (b"k8s:enc:aescbc:v1:", OtherFormat::AesCbc),
        (b"k8s:enc:aesgcm:v1:", OtherFormat::AesGcm),
        (b"k8s:enc:secretbox:v1:", OtherFormat::Secretbox),
        (b"k8s:enc:kms:v1:", OtherFormat::KmsV1),
    ];
    for (prefix, format) in others {
        if value.starts_with(prefix) {
            return Stored::Other(format);
        }
    }
    if value.starts_with(b"k8s\0") {
        Stored::Identity(Identity::Protobuf)
    } else if value.first() == Some(&b'{') {
        Stored::Identity(Identity::Json)
    } else {
        Stored::Unknown("no known prefix")
    }
}

fn parse_kms_v2(rest: &[u8]) -> Stored {
    // `<provider>:` then the envelope. Provider names cannot contain ':' (the apiserver
    // validates them), so the first ':' ends it.
    let Some(colon) = rest.iter().position(|&b| b == b':') else {
        return Stored::Unknown("kms:v2 value without a provider name");
    };
    let Ok(provider) = std::str::from_utf8(&rest[..colon]) else {
        return Stored::Unknown("kms:v2 provider name is not UTF-8");
    };
    if provider.is_empty() {
        return Stored::Unknown("kms:v2 value without a provider name");
    }
    let object = match EncryptedObject::decode(&rest[colon + 1..]) {
        Ok(o) => o,
        Err(_) => return Stored::Unknown("kms:v2 envelope does not decode"),
    };
    // The apiserver refuses to write these (its validation), so they mean a damaged value.
    if object.key_id.is_empty() || object.encrypted_dek_source.is_empty() || object.encrypted_data.is_empty() {
        return Stored::Unknown("kms:v2 envelope lacks keyID, encryptedDEKSource or encryptedData");
    }
    Stored::KmsV2 {
        provider: provider.to_string(),
        object,
    }
}

/// `<prefix><resource>/…` → `resource`; keys outside the prefix give `None`.
pub fn resource<'a>(prefix: &[u8], key: &'a [u8]) -> Option<&'a [u8]> {
    let rest = key.strip_prefix(prefix)?;
    Some(match rest.iter().position(|&b| b == b'/') {
        Some(i) => &rest[..i],
        None => rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kms_v2(provider: &str, o: &EncryptedObject) -> Vec<u8> {
        let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
        v.extend(o.encode_to_vec());
        v
    }

    fn object() -> EncryptedObject {
        EncryptedObject {
            encrypted_data: vec![1, 2, 3],
            key_id: "local:abc".into(),
            encrypted_dek_source: vec![9; 61],
            annotations: [("kek.kms-plugin.dev".to_string(), vec![7; 40])].into(),
            encrypted_dek_source_type: 1,
        }
    }

    #[test]
    fn kms_v2_round_trip() {
        let o = object();
        match parse(&kms_v2("kms-plugin", &o)) {
            Stored::KmsV2 { provider, object } => {
                assert_eq!(provider, "kms-plugin");
                assert_eq!(object, o);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_formats_and_identity() {
        assert_eq!(parse(b"k8s:enc:aescbc:v1:key1:xyz"), Stored::Other(OtherFormat::AesCbc));
        assert_eq!(parse(b"k8s:enc:aesgcm:v1:k:"), Stored::Other(OtherFormat::AesGcm));
        assert_eq!(parse(b"k8s:enc:secretbox:v1:k:"), Stored::Other(OtherFormat::Secretbox));
        assert_eq!(parse(b"k8s:enc:kms:v1:k:\x00\x01"), Stored::Other(OtherFormat::KmsV1));
        assert_eq!(parse(b"k8s\0\x0a\x0c"), Stored::Identity(Identity::Protobuf));
        assert_eq!(parse(b"{\"kind\":\"Widget\"}"), Stored::Identity(Identity::Json));
    }

    #[test]
    fn corrupt_values_are_unknown() {
        let good = kms_v2("p", &object());
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            b"k8s".to_vec(),
            b"k8s:enc:kms:v2:".to_vec(),
            b"k8s:enc:kms:v2:noprovider".to_vec(),
            b"k8s:enc:kms:v2::\x0a\x01a".to_vec(),
            b"k8s:enc:kms:v2:p:\xff\xff\xff".to_vec(),
            b"k8s:enc:kms:v2:\xff:\x0a\x01a".to_vec(),
            // keyID that is not UTF-8
            b"k8s:enc:kms:v2:p:\x12\x02\xff\xfe".to_vec(),
            // an empty envelope: no keyID
            b"k8s:enc:kms:v2:p:".to_vec(),
            good[..good.len() - 5].to_vec(),
            b"garbage".to_vec(),
        ];
        for c in cases {
            assert!(matches!(parse(&c), Stored::Unknown(_)), "{c:?}");
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_is_handled() {
        let good = kms_v2("p", &object());
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut v = good.clone();
                v[i] ^= 1 << bit;
                let _ = parse(&v);
            }
        }
    }

    #[test]
    fn resource_segment() {
        assert_eq!(
            resource(b"/registry/", b"/registry/secrets/ns/a"),
            Some(&b"secrets"[..])
        );
        assert_eq!(
            resource(b"/registry/", b"/registry/namespaces"),
            Some(&b"namespaces"[..])
        );
        assert_eq!(resource(b"/registry/", b"/other/x"), None);
    }
}

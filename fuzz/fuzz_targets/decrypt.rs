//! Fuzzes the Decrypt path end to end through the gRPC service (without the socket): any
//! ciphertext, key_id and annotations, alone or as mutations of a valid request. The plugin must
//! never panic and never return plaintext other than the one that was sealed.
#![no_main]

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use kms_plugin::backend::local::LocalBackend;
use kms_plugin::keys::Kek;
use kms_plugin::keys::Keys;
use kms_plugin::keys::rotation::RotationPolicy;
use kms_plugin::proto::v2::key_management_service_server::KeyManagementService;
use kms_plugin::proto::v2::{DecryptRequest, EncryptRequest};
use kms_plugin::service::KmsService;
use kms_plugin::settings::ApiVersion;
use libfuzzer_sys::fuzz_target;

const SEED: [u8; 32] = [0x5a; 32];

struct World {
    rt: tokio::runtime::Runtime,
    service: KmsService,
    valid: DecryptRequest,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let backend = LocalBackend::from_keys(
            Kek::from_bytes(&[1; 32]).unwrap(),
            vec![Kek::from_bytes(&[2; 32]).unwrap()],
        );
        let keys = Keys::new(
            Arc::new(backend),
            RotationPolicy::default(),
            NonZeroUsize::new(8).unwrap(),
            Duration::from_secs(3600),
        );
        let service = KmsService::new(keys, ApiVersion::V2);
        let e = rt
            .block_on(service.encrypt(tonic::Request::new(EncryptRequest {
                plaintext: SEED.to_vec().into(),
                uid: String::new(),
            })))
            .unwrap()
            .into_inner();
        let valid = DecryptRequest {
            ciphertext: e.ciphertext,
            uid: String::new(),
            key_id: e.key_id,
            annotations: e.annotations,
        };
        World { rt, service, valid }
    })
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw {
        ciphertext: Vec<u8>,
        key_id: String,
        annotations: Vec<(String, Vec<u8>)>,
    },
    Mutate {
        ciphertext_flip: Option<(u16, u8)>,
        kek_flip: Option<(u16, u8)>,
        key_id: Option<String>,
        truncate: Option<u16>,
        extra: Option<(String, Vec<u8>)>,
    },
}

fn flip(b: &bytes::Bytes, at: Option<(u16, u8)>) -> bytes::Bytes {
    match at {
        Some((i, x)) if !b.is_empty() && x != 0 => {
            let mut v = b.to_vec();
            let i = i as usize % v.len();
            v[i] ^= x;
            v.into()
        }
        _ => b.clone(),
    }
}

fuzz_target!(|input: Input| {
    let w = world();
    let req = match input {
        Input::Raw {
            ciphertext,
            key_id,
            annotations,
        } => DecryptRequest {
            ciphertext: ciphertext.into(),
            uid: String::new(),
            key_id,
            annotations: annotations
                .into_iter()
                .map(|(k, v)| (k, v.into()))
                .collect::<HashMap<_, _>>(),
        },
        Input::Mutate {
            ciphertext_flip,
            kek_flip,
            key_id,
            truncate,
            extra,
        } => {
            let mut r = w.valid.clone();
            r.ciphertext = flip(&r.ciphertext, ciphertext_flip);
            if let Some(n) = truncate {
                r.ciphertext = r.ciphertext.slice(..(n as usize).min(r.ciphertext.len()));
            }
            for v in r.annotations.values_mut() {
                *v = flip(v, kek_flip);
            }
            if let Some(k) = key_id {
                r.key_id = k;
            }
            if let Some((k, v)) = extra {
                r.annotations.insert(k, v.into());
            }
            r
        }
    };
    if let Ok(resp) = w.rt.block_on(w.service.decrypt(tonic::Request::new(req))) {
        // Only the sealed seed may ever come back.
        assert_eq!(&resp.into_inner().plaintext[..], &SEED[..]);
    }
});

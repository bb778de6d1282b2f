//! Encrypt: seal the apiserver's seed under the current local KEK.

use std::collections::HashMap;

use crate::contract::KEK_ANNOTATION;
use crate::error::Error;
use crate::keys::Keys;
use crate::keys::envelope::MAX_PLAINTEXT;
use crate::proto::v2::{EncryptRequest, EncryptResponse};

/// A plaintext whose size the envelope can carry within the apiserver's ciphertext limit.
struct Checked {
    plaintext: bytes::Bytes,
}

fn check(request: EncryptRequest) -> Result<Checked, Error> {
    match request.plaintext.len() {
        0 => Err(Error::InvalidArgument("plaintext is empty".into())),
        n if n > MAX_PLAINTEXT => Err(Error::InvalidArgument(format!(
            "plaintext of {n} bytes exceeds {MAX_PLAINTEXT} (the sealed result must fit 1024 bytes)"
        ))),
        _ => Ok(Checked {
            plaintext: request.plaintext,
        }),
    }
}

pub async fn handle(keys: &Keys, request: EncryptRequest) -> Result<EncryptResponse, Error> {
    let checked = check(request)?;
    let sealed = keys.encrypt(&checked.plaintext).await;
    // The request buffer held the seed; wipe it if we are its only owner.
    if let Ok(mut buf) = checked.plaintext.try_into_mut() {
        zeroize::Zeroize::zeroize(&mut buf[..]);
    }
    let sealed = sealed?;
    Ok(EncryptResponse {
        ciphertext: sealed.ciphertext.into(),
        key_id: sealed.key_id,
        annotations: HashMap::from([(KEK_ANNOTATION.to_string(), sealed.wrapped_kek)]),
    })
}

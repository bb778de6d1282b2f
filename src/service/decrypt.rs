//! Decrypt: open a seed this plugin sealed, under any root key it still knows.

use bytes::Bytes;

use crate::contract::{self, KEK_ANNOTATION, MAX_WRAPPED_KEK};
use crate::error::Error;
use crate::keys::Keys;
use crate::proto::v2::{DecryptRequest, DecryptResponse};
use crate::shares::Peer;

/// The parts of a Decrypt request after the contract's checks.
struct Checked<'a> {
    key_id: &'a str,
    wrapped_kek: &'a Bytes,
    ciphertext: &'a [u8],
}

fn check(request: &DecryptRequest) -> Result<Checked<'_>, Error> {
    contract::check_key_id(&request.key_id).map_err(Error::InvalidArgument)?;
    if let Some(other) = request.annotations.keys().find(|k| k.as_str() != KEK_ANNOTATION) {
        let shown: String = other.chars().take(64).collect();
        return Err(Error::InvalidArgument(format!("unexpected annotation {shown:?}")));
    }
    let wrapped_kek = request
        .annotations
        .get(KEK_ANNOTATION)
        .ok_or_else(|| Error::InvalidArgument(format!("missing annotation {KEK_ANNOTATION}")))?;
    if wrapped_kek.is_empty() || wrapped_kek.len() > MAX_WRAPPED_KEK {
        return Err(Error::InvalidArgument(format!(
            "annotation {KEK_ANNOTATION} of {} bytes is not a wrapped KEK",
            wrapped_kek.len()
        )));
    }
    Ok(Checked {
        key_id: &request.key_id,
        wrapped_kek,
        ciphertext: &request.ciphertext,
    })
}

pub async fn handle(keys: &Keys, request: &DecryptRequest, peer: Option<Peer>) -> Result<DecryptResponse, Error> {
    let checked = check(request)?;
    let plaintext = keys
        .decrypt(checked.key_id, checked.wrapped_kek, checked.ciphertext, peer)
        .await?;
    Ok(DecryptResponse {
        plaintext: plaintext.into_wire().into(),
    })
}

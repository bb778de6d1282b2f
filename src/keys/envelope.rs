//! The ciphertext format returned by Encrypt: the apiserver's seed sealed under a local KEK.
//!
//! Layout (format version 1): `0x01 || nonce (12) || AES-256-GCM(seed) || tag (16)`.
//! The AAD binds the format version, the root key_id and the local KEK's identity (`KekRef`),
//! so a ciphertext replayed under another key_id or another wrapped KEK fails authentication.
//! The version byte lets the format evolve: readers reject versions they do not know.

use ring::rand::SystemRandom;

use super::cache::KekRef;
use crate::secret::{Kek, Plaintext, aead};

/// The only format this build writes and reads.
pub const VERSION: u8 = 1;
pub use crate::contract::MAX_CIPHERTEXT;
/// Bytes the envelope adds to a plaintext.
pub const OVERHEAD: usize = 1 + aead::OVERHEAD;
/// Largest plaintext whose envelope the apiserver accepts.
pub const MAX_PLAINTEXT: usize = MAX_CIPHERTEXT - OVERHEAD;

const AAD_DOMAIN: &[u8] = b"kms-plugin/envelope\0";

pub use crate::error::EnvelopeError;

/// A ciphertext whose framing has been checked, ready to open once its KEK is known.
pub struct Envelope<'a> {
    sealed: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Checks framing only (length, version) so bad input is refused before any key lookup.
    pub fn parse(ciphertext: &'a [u8]) -> Result<Self, EnvelopeError> {
        match ciphertext {
            [] => Err(EnvelopeError::Empty),
            c if c.len() > MAX_CIPHERTEXT => Err(EnvelopeError::TooLong(c.len())),
            [v, ..] if *v != VERSION => Err(EnvelopeError::UnknownVersion(*v)),
            c if c.len() <= OVERHEAD => Err(EnvelopeError::Truncated {
                len: c.len(),
                overhead: OVERHEAD,
            }),
            [_, sealed @ ..] => Ok(Self { sealed }),
        }
    }

    /// Authenticates and decrypts; never returns bytes that were not sealed under these inputs.
    pub fn open(&self, kek: &Kek, key_id: &str, kek_ref: &KekRef) -> Result<Plaintext, EnvelopeError> {
        aead::open(kek, &aad(key_id, kek_ref), self.sealed)
            .map(|p| Plaintext::new(p.to_vec()))
            .map_err(|_| EnvelopeError::Authentication)
    }
}

/// Seals `plaintext` (1..=MAX_PLAINTEXT bytes, checked by the caller) under `kek`.
pub fn seal(
    kek: &Kek,
    key_id: &str,
    kek_ref: &KekRef,
    plaintext: &[u8],
    rng: &SystemRandom,
) -> Result<Vec<u8>, ring::error::Unspecified> {
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.push(VERSION);
    aead::seal_into(&mut out, kek, &aad(key_id, kek_ref), plaintext, rng)?;
    Ok(out)
}

fn aad(key_id: &str, kek_ref: &KekRef) -> Vec<u8> {
    // Length-prefix the variable field so no two (key_id, kek_ref) pairs share an AAD.
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 3 + key_id.len() + 32);
    aad.extend_from_slice(AAD_DOMAIN);
    aad.push(VERSION);
    aad.extend_from_slice(&(key_id.len() as u16).to_be_bytes());
    aad.extend_from_slice(key_id.as_bytes());
    aad.extend_from_slice(kek_ref.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (SystemRandom, Kek, KekRef) {
        let rng = SystemRandom::new();
        let kek = Kek::generate(&rng).unwrap();
        (rng, kek, KekRef::new("local:a", b"wrapped"))
    }

    #[test]
    fn round_trip_is_exact_and_randomised() {
        let (rng, kek, r) = setup();
        let seed = [42u8; 32];
        let c1 = seal(&kek, "local:a", &r, &seed, &rng).unwrap();
        let c2 = seal(&kek, "local:a", &r, &seed, &rng).unwrap();
        assert_ne!(c1, c2, "same plaintext must give distinct ciphertexts");
        assert_eq!(c1.len(), 32 + OVERHEAD);
        assert_eq!(c1[0], VERSION);
        let p = Envelope::parse(&c1).unwrap().open(&kek, "local:a", &r).unwrap();
        assert_eq!(p.expose(), &seed);
    }

    #[test]
    fn binding_to_key_id_and_kek_ref() {
        let (rng, kek, r) = setup();
        let c = seal(&kek, "local:a", &r, b"seed", &rng).unwrap();
        let env = Envelope::parse(&c).unwrap();
        assert_eq!(env.open(&kek, "local:b", &r).err(), Some(EnvelopeError::Authentication));
        let other = KekRef::new("local:a", b"wrapped2");
        assert_eq!(
            env.open(&kek, "local:a", &other).err(),
            Some(EnvelopeError::Authentication)
        );
    }

    #[test]
    fn framing_errors() {
        let (rng, kek, r) = setup();
        let c = seal(&kek, "local:a", &r, b"seed", &rng).unwrap();
        assert_eq!(Envelope::parse(&[]).err(), Some(EnvelopeError::Empty));
        assert_eq!(
            Envelope::parse(&c[..OVERHEAD]).err(),
            Some(EnvelopeError::Truncated {
                len: OVERHEAD,
                overhead: OVERHEAD
            })
        );
        assert_eq!(
            Envelope::parse(&[VERSION]).err(),
            Some(EnvelopeError::Truncated {
                len: 1,
                overhead: OVERHEAD
            })
        );
        let mut v2 = c.clone();
        v2[0] = 2;
        assert_eq!(Envelope::parse(&v2).err(), Some(EnvelopeError::UnknownVersion(2)));
        let big = vec![VERSION; MAX_CIPHERTEXT + 1];
        assert_eq!(
            Envelope::parse(&big).err(),
            Some(EnvelopeError::TooLong(MAX_CIPHERTEXT + 1))
        );
        // Largest plaintext still fits the apiserver's limit.
        let max = seal(&kek, "local:a", &r, &[1u8; MAX_PLAINTEXT], &rng).unwrap();
        assert_eq!(max.len(), MAX_CIPHERTEXT);
        assert!(Envelope::parse(&max).is_ok());
    }
}

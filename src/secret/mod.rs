//! Secret key material in types that wipe themselves and cannot be printed, and the one AEAD
//! that uses it. A leaf: imports nothing of the crate, so backends and the key hierarchy share it.
//!
//! Neither type implements `Debug`, `Display`, `Clone` or `serde::Serialize`; the only way to
//! read the bytes is the explicitly named `expose` call, which keeps every use greppable.

pub mod aead;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Length of every AES-256 key in this plugin (local KEKs and local root keys).
pub const KEY_LEN: usize = 32;

/// A 256-bit AES key (a local KEK or a local root key). Wiped on drop.
///
/// The bytes live in one heap allocation for the key's whole life: moving a `Kek` (out of a
/// backend call, through `.await`s, into an `Arc`) moves a pointer. An inline array would be
/// copied by every move, and a moved-from copy is never dropped, so never wiped.
pub struct Kek(Box<Zeroizing<[u8; KEY_LEN]>>);

impl Kek {
    /// A fresh key from the operating system's CSPRNG, written straight into its allocation.
    pub fn generate(rng: &SystemRandom) -> Result<Self, ring::error::Unspecified> {
        let mut key = Self::zeroed();
        rng.fill(&mut key.0[..])?;
        Ok(key)
    }

    /// Copies key bytes into a new key; the caller's buffer should itself be zeroizing.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let mut key = Self::zeroed();
        key.0.copy_from_slice(bytes);
        Some(key)
    }

    fn zeroed() -> Self {
        Self(Box::new(Zeroizing::new([0u8; KEY_LEN])))
    }

    /// The raw key bytes. Never log, store or send them unwrapped.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// Plaintext handed to Encrypt or returned by Decrypt (the apiserver's seed). Wiped on drop.
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    /// Wraps a plaintext buffer so it is wiped when dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The plaintext bytes. Never log them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Hands the buffer to the wire encoder; from here on the transport owns it.
    pub fn into_wire(mut self) -> Vec<u8> {
        std::mem::take(&mut *self.0)
    }
}

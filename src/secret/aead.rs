//! AES-256-GCM with random 96-bit nonces, the one AEAD this plugin uses (ring).
//!
//! Sealed layout: `nonce (12) || ciphertext || tag (16)`. The key schedule is built per call so
//! that only the zeroizing `Kek` is kept between calls. ring does not wipe the schedule it builds
//! on the stack, and an AES-256 schedule begins with the key itself; so each call runs in a frame
//! of its own and the stack it used is zeroed before returning ([`wipe_stack`]).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::Kek;

/// Bytes added by sealing: nonce and tag.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;

fn key(kek: &Kek) -> LessSafeKey {
    // Cannot fail: the key length is fixed by the type.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, kek.expose()).expect("32-byte AES-256 key"))
}

/// Stack zeroed after each call: well above what ring's AES-GCM uses (a few hundred bytes of
/// schedule and GHASH table, plus its call frames).
const WIPE_BYTES: usize = 16 * 1024;

/// Zeroes the stack below the caller, where the call it just made left key schedules and copies.
/// Safe code can only do this by owning the area: a zeroed array that `black_box` forces to be
/// written. Costs well under a microsecond (a memset of 16 KiB).
#[inline(never)]
fn wipe_stack() {
    let mut area = [0u8; WIPE_BYTES];
    std::hint::black_box(&mut area);
}

/// Appends `nonce || AES-256-GCM(plaintext, aad) || tag` to `out`.
pub fn seal_into(
    out: &mut Vec<u8>,
    kek: &Kek,
    aad: &[u8],
    plaintext: &[u8],
    rng: &SystemRandom,
) -> Result<(), ring::error::Unspecified> {
    let sealed = seal_in_own_frame(out, kek, aad, plaintext, rng);
    wipe_stack();
    sealed
}

/// Opens a `nonce || ciphertext || tag` blob; fails on any length or authentication problem.
pub fn open(kek: &Kek, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, ring::error::Unspecified> {
    let opened = open_in_own_frame(kek, aad, sealed);
    wipe_stack();
    opened
}

#[inline(never)]
fn seal_in_own_frame(
    out: &mut Vec<u8>,
    kek: &Kek,
    aad: &[u8],
    plaintext: &[u8],
    rng: &SystemRandom,
) -> Result<(), ring::error::Unspecified> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)?;
    out.reserve(OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let tag =
        key(kek).seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[start..])?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

#[inline(never)]
fn open_in_own_frame(kek: &Kek, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, ring::error::Unspecified> {
    if sealed.len() < OVERHEAD {
        return Err(ring::error::Unspecified);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce)?;
    let mut buf = Zeroizing::new(body.to_vec());
    let len = key(kek).open_in_place(nonce, Aad::from(aad), &mut buf)?.len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let rng = SystemRandom::new();
        let kek = Kek::generate(&rng).unwrap();
        let mut sealed = Vec::new();
        seal_into(&mut sealed, &kek, b"aad", b"secret", &rng).unwrap();
        assert_eq!(sealed.len(), 6 + OVERHEAD);
        assert_eq!(&open(&kek, b"aad", &sealed).unwrap()[..], b"secret");
        assert!(open(&kek, b"other", &sealed).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(&kek, b"aad", &bad).is_err(), "flip at {i} accepted");
        }
        assert!(open(&kek, b"aad", &sealed[..OVERHEAD - 1]).is_err());
        let other = Kek::generate(&rng).unwrap();
        assert!(open(&other, b"aad", &sealed).is_err());
    }
}

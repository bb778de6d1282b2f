//! Property tests over the envelope format, the contract checks and the config parser: exact
//! round trips, no wrong plaintext from any tampering, and no panic on any input.

use std::collections::HashMap;

use kms_plugin::contract;
use kms_plugin::keys::Kek;
use kms_plugin::keys::cache::KekRef;
use kms_plugin::keys::envelope::{self, Envelope, EnvelopeError, MAX_PLAINTEXT};
use kms_plugin::settings::Settings;
use proptest::prelude::*;
use ring::rand::SystemRandom;

fn kek(seed: u8) -> Kek {
    Kek::from_bytes(&[seed; 32]).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn seal_open_round_trips(plain in proptest::collection::vec(any::<u8>(), 1..=MAX_PLAINTEXT),
                             key_id in "[ -~]{1,64}", wrapped in proptest::collection::vec(any::<u8>(), 1..128)) {
        let rng = SystemRandom::new();
        let r = KekRef::new(&key_id, &wrapped);
        let c = envelope::seal(&kek(1), &key_id, &r, &plain, &rng).unwrap();
        prop_assert!(c.len() <= contract::MAX_CIPHERTEXT);
        let p = Envelope::parse(&c).unwrap().open(&kek(1), &key_id, &r).unwrap();
        prop_assert_eq!(p.expose(), &plain[..]);
    }

    #[test]
    fn any_tampering_is_refused(plain in proptest::collection::vec(any::<u8>(), 1..64),
                                pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let rng = SystemRandom::new();
        let r = KekRef::new("k", b"w");
        let mut c = envelope::seal(&kek(2), "k", &r, &plain, &rng).unwrap();
        let i = pos.index(c.len());
        c[i] ^= 1 << bit;
        match Envelope::parse(&c) {
            Ok(env) => prop_assert_eq!(env.open(&kek(2), "k", &r).err(), Some(EnvelopeError::Authentication)),
            Err(e) => prop_assert_eq!(e, EnvelopeError::UnknownVersion(c[0])),
        }
    }

    #[test]
    fn arbitrary_ciphertext_never_opens(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
        let r = KekRef::new("k", b"w");
        if let Ok(env) = Envelope::parse(&bytes) {
            prop_assert!(env.open(&kek(3), "k", &r).is_err());
        }
    }

    #[test]
    fn annotation_checks_never_panic_and_accept_only_fqdns(key in "\\PC{0,80}", value in proptest::collection::vec(any::<u8>(), 0..64)) {
        let ok = contract::check_annotation_key(&key).is_ok();
        if ok {
            prop_assert!(key.contains('.') && key.len() <= 253);
            prop_assert!(key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
        }
        let m = HashMap::from([(key, value)]);
        prop_assert_eq!(contract::check_annotations(&m).is_ok(), ok);
    }

    #[test]
    fn config_parser_never_panics(text in "\\PC{0,200}") {
        let _ = Settings::from_toml(&text);
    }

    #[test]
    fn config_parser_never_panics_on_near_valid_input(field in "[a-z_]{1,12}", value in "[ -~]{0,20}") {
        let text = format!("[kek]\n{field} = {value}\n[backend]\ntype = \"local\"\ncurrent_key_file = \"/k\"\n");
        let _ = Settings::from_toml(&text);
    }
}

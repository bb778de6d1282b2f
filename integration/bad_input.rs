//! Every class of bad input gets a precise gRPC status, a log line, and no panic; the plugin
//! keeps serving afterwards and never returns wrong plaintext.

use std::collections::HashMap;

use bytes::Bytes;
use tonic::Code;

use crate::common::*;
use kms_plugin::contract::KEK_ANNOTATION;
use kms_plugin::proto::v2::{DecryptRequest, EncryptRequest};

#[tokio::test]
async fn bad_encrypt_requests() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let mut c = plugin.client().await;
    for (n, code) in [
        (0, Code::InvalidArgument),
        (996, Code::InvalidArgument),
        (3_000, Code::InvalidArgument),
        // Larger than the server reads at all (4 KiB): the gRPC code for "over the limit".
        (60_000, Code::ResourceExhausted),
        (100_000, Code::ResourceExhausted),
    ] {
        let err = c
            .encrypt(EncryptRequest {
                plaintext: vec![7u8; n].into(),
                uid: "u".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{n} bytes: {err:?}");
    }
    assert_eq!(status(&mut c).await.healthz, "ok");
    plugin.stop().await;
}

#[tokio::test]
async fn bad_decrypt_requests() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let good = decrypt_request(&encrypt(&mut c, &seed).await);
    // Another instance on the same root key makes its own local KEK.
    let other_socket = dir.path("other/kms.sock").display().to_string();
    let other_plugin = Plugin::start(&dir.config(&other_socket, "root.key", &[], "")).await;
    let other = decrypt_request(&encrypt(&mut other_plugin.client().await, &rand_bytes(32)).await);
    other_plugin.stop().await;
    assert_ne!(other.annotations[KEK_ANNOTATION], good.annotations[KEK_ANNOTATION]);
    let wrapped = good.annotations[KEK_ANNOTATION].clone();

    let with = |f: &dyn Fn(&mut DecryptRequest)| {
        let mut r = good.clone();
        f(&mut r);
        r
    };
    let flip = |b: &Bytes, i: usize| {
        let mut v = b.to_vec();
        let i = if i == usize::MAX { v.len() - 1 } else { i };
        v[i] ^= 0x01;
        Bytes::from(v)
    };
    let mut garbage = rand_bytes(61);
    garbage[0] = 1;
    let cases: Vec<(&str, DecryptRequest, Code)> = vec![
        (
            "empty ciphertext",
            with(&|r| r.ciphertext = Bytes::new()),
            Code::InvalidArgument,
        ),
        (
            "truncated ciphertext",
            with(&|r| r.ciphertext = r.ciphertext.slice(..20)),
            Code::InvalidArgument,
        ),
        (
            "version byte only",
            with(&|r| r.ciphertext = r.ciphertext.slice(..1)),
            Code::InvalidArgument,
        ),
        (
            "oversized ciphertext",
            with(&|r| r.ciphertext = vec![1u8; 1025].into()),
            Code::InvalidArgument,
        ),
        (
            "unknown format version",
            with(&|r| r.ciphertext = flip(&r.ciphertext, 0)),
            Code::InvalidArgument,
        ),
        (
            "garbage ciphertext",
            with(&|r| r.ciphertext = garbage.clone().into()),
            Code::DataLoss,
        ),
        (
            "tag does not verify",
            with(&|r| r.ciphertext = flip(&r.ciphertext, usize::MAX)),
            Code::DataLoss,
        ),
        (
            "nonce tampered",
            with(&|r| r.ciphertext = flip(&r.ciphertext, 3)),
            Code::DataLoss,
        ),
        (
            "empty key_id",
            with(&|r| r.key_id = String::new()),
            Code::InvalidArgument,
        ),
        (
            "oversized key_id",
            with(&|r| r.key_id = "k".repeat(1025)),
            Code::InvalidArgument,
        ),
        (
            "unknown key_id",
            with(&|r| r.key_id = "local:00000000000000000000000000000000".into()),
            Code::NotFound,
        ),
        (
            "missing annotation",
            with(&|r| r.annotations.clear()),
            Code::InvalidArgument,
        ),
        (
            "extra annotation",
            with(&|r| {
                r.annotations
                    .insert("extra.example.io".into(), Bytes::from_static(b"x"));
            }),
            Code::InvalidArgument,
        ),
        (
            "foreign annotation only",
            with(&|r| r.annotations = HashMap::from([("kek.example.io".into(), wrapped.clone())])),
            Code::InvalidArgument,
        ),
        (
            "empty wrapped KEK",
            with(&|r| {
                r.annotations.insert(KEK_ANNOTATION.into(), Bytes::new());
            }),
            Code::InvalidArgument,
        ),
        (
            "wrapped KEK does not unwrap",
            with(&|r| {
                r.annotations.insert(KEK_ANNOTATION.into(), flip(&wrapped, 20));
            }),
            Code::DataLoss,
        ),
        (
            "wrapped KEK longer than the backend makes",
            with(&|r| {
                r.annotations.insert(KEK_ANNOTATION.into(), vec![0u8; 61].into());
            }),
            Code::InvalidArgument,
        ),
        (
            "garbled short wrapped KEK",
            with(&|r| {
                r.annotations
                    .insert(KEK_ANNOTATION.into(), Bytes::from_static(b"\x00\x01"));
            }),
            Code::DataLoss,
        ),
        (
            "another local KEK's annotation",
            with(&|r| r.annotations = other.annotations.clone()),
            Code::DataLoss,
        ),
    ];
    for (what, req, code) in cases {
        let err = c.decrypt(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what}: no message");
    }
    // Still healthy and still correct after all of that.
    assert_eq!(status(&mut c).await.healthz, "ok");
    assert_eq!(c.decrypt(good).await.unwrap().into_inner().plaintext.to_vec(), seed);
    // Each bad call logs a line (read from the plugin's stderr by a thread: wait for it).
    eventually("a logged line for each bad call", || async {
        plugin.logs().matches("failed").count() >= 19
    })
    .await;
    plugin.stop().await;
}

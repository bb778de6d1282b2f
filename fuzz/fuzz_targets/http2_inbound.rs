//! Fuzzes the `:authority` rewriter (`server::http2`) on arbitrary client bytes, cut into
//! arbitrary reads: never a panic, never more than one header block held, and when nothing was
//! rewritten the server reads exactly what the client sent. The server-side watcher gets the
//! same bytes (it must not panic on any frame sequence either).
#![no_main]

use kms_plugin::server::http2::inbound::{Inbound, MAX_BLOCK, PREFACE};
use kms_plugin::server::http2::refusals::Outbound;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size; a preface is prepended so frames get parsed.
    let Some((&cut, rest)) = data.split_first() else { return };
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(rest);
    let mut inbound = Inbound::default();
    let mut out = Vec::new();
    for piece in input.chunks(usize::from(cut) + 1) {
        let before = out.len();
        inbound.push(piece, &mut out);
        // Output never runs ahead of input by more than a rewritten block's growth.
        assert!(out.len() - before <= piece.len() + 2 * MAX_BLOCK);
    }
    inbound.finish(&mut out);
    if inbound.rewritten() == 0 {
        assert_eq!(out, input);
    }
    let mut outbound = Outbound::default();
    outbound.observe(rest, |_| {});
});

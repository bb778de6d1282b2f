//! Integration tests: the built binary, over its real Unix socket, with a real gRPC client.

mod common;

mod aws;
mod bad_input;
mod bench_smoke;
mod cli;
mod deploy;
mod hardening;
mod hierarchy;
mod host_layout;
mod hostile_vault;
mod inventory;
mod kmip;
mod kmip_answers;
mod layering;
mod ops;
mod pkcs11;
mod protocol;
mod recipes;
mod reload;
mod socket;
mod vault;

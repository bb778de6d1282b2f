//! Integration tests: the built binary, over its real Unix socket, with a real gRPC client.

mod common;

mod authority;
mod aws;
#[cfg(feature = "azure")]
mod azure;
mod bad_input;
mod bench_smoke;
mod cli;
mod deploy;
#[cfg(feature = "gcp")]
mod gcp;
mod hardening;
mod hierarchy;
mod host_layout;
mod hostile_vault;
mod inventory;
mod kmip;
mod kmip_answers;
mod layering;
mod memory;
mod messages;
mod ops;
mod pkcs11;
mod protocol;
mod readme;
mod recipes;
mod reload;
mod socket;
mod suite;
mod vault;

//! End-to-end suite: a real kube-apiserver stores Secrets through the built plugin.
//!
//! Not part of the README's test command: it needs a kube-apiserver binary, which no package
//! registry here ships. Run it with any kube-apiserver 1.29 or newer:
//!
//! ```text
//! KMS_E2E_KUBE_APISERVER=/path/to/kube-apiserver bash integration/e2e.sh
//! ```
//!
//! Every test is `#[ignore]`d so `cargo test` builds but skips them; `integration/e2e.sh` runs
//! them with `--ignored`, and each one fails with a clear message when the binary is missing.
//! Lines starting `E2E-MEASURE` are the times docs/operations.md records.

#[path = "../common/mod.rs"]
#[allow(dead_code)]
mod common;

mod backends;
mod cluster;
mod lifecycle;
mod migrate;
mod multinode;
mod recipes;
mod servers;

#!/usr/bin/env bash
# The project's one test command (README "Run the tests"; .ci/run calls it).
# Installs what the tests need, idempotently, then runs every test: unit tests, and integration
# tests that start the built binary and talk to it over its socket, against real SoftHSM2,
# moto (AWS KMS compatible), OpenBao (Vault Transit), PyKMIP (KMIP) and etcd servers.
# Nothing is skipped: a missing tool fails the test. (The end-to-end suite against a real
# kube-apiserver is separate: integration/e2e.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
source integration/deps.sh

cargo test --locked --all-targets --features cloud

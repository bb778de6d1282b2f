#!/usr/bin/env bash
# The end-to-end suite: a real kube-apiserver (1.29 or newer, given by path) stores Secrets
# through the built plugin, with Debian's etcd and the same test servers as integration/test.sh.
#   KMS_E2E_KUBE_APISERVER=/path/to/kube-apiserver bash integration/e2e.sh [test name filter]
# Lines starting E2E-MEASURE are the times docs/operations.md records.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x "${KMS_E2E_KUBE_APISERVER:-}" ]; then
  echo "e2e: set KMS_E2E_KUBE_APISERVER to a kube-apiserver binary (1.29 or newer)" >&2
  exit 1
fi
echo "e2e: $("$KMS_E2E_KUBE_APISERVER" --version) ($KMS_E2E_KUBE_APISERVER)"
source integration/deps.sh

# The tests are #[ignore]d in the normal suite; three at a time keeps the wall time down while
# most of it is the apiserver's own 1-minute Status poll.
cargo test --locked --features cloud --test e2e -- --ignored --nocapture --test-threads "${KMS_E2E_THREADS:-3}" "$@"

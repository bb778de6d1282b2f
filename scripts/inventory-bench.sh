#!/usr/bin/env bash
# `kms-plugin inventory` throughput and peak memory against a real etcd (BENCHMARKS.md).
# Starts its own etcd on loopback (needs /usr/bin/etcd: apt-get install etcd-server), writes
# INVENTORY_BENCH_OBJECTS (default 200,000) objects in the apiserver's formats with seeds sealed
# by the running plugin, then times the inventory without and with --verify, under
# /usr/bin/time for the peak RSS. The work is the ignored test `inventory::inventory_bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
export INVENTORY_BENCH_OBJECTS="${INVENTORY_BENCH_OBJECTS:-200000}"
# PROFILE=dev measures the debug build (its dependencies are built with opt-level 2, see
# Cargo.toml), which saves the long release build on a small machine.
PROFILE="${PROFILE:-release}"
cargo test --profile "$PROFILE" --test plugin -- --ignored --exact inventory::inventory_bench --nocapture 2>&1 \
  | grep -E '^inventory_bench:|test result|panicked|FAILED'

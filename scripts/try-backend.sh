#!/usr/bin/env bash
# Runs the README's set-up block for one backend (the ```sh readme-test:<backend> block) in a
# directory of its own: a throw-away server on loopback, a key, the plugin's config, `check`,
# the plugin serving, one Encrypt and Decrypt with kms-bench. On a terminal it then waits for
# Enter; either way it stops everything it started when it ends. CI runs it for every backend
# (integration/readme.rs), so the README's steps are the ones that were tested.
#
#   bash scripts/try-backend.sh pkcs11              # in ./kms-try/pkcs11
#   PORT=18200 bash scripts/try-backend.sh vault /tmp/try-vault
#
# Needs kms-plugin and kms-bench on PATH, and the servers the block uses (README, "Backends").
set -euo pipefail

backends="local pkcs11 aws vault kmip gcp azure"
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  echo "usage: bash scripts/try-backend.sh {${backends// /|}} [DIR]" >&2
  [ $# -ge 1 ] && [ "$1" != -h ] && [ "$1" != --help ] && exit 2
  exit 0
fi
backend=$1
dir=${2:-kms-try/$backend}
readme="$(cd "$(dirname "$0")/.." && pwd)/README.md"

# The lines between the block's opening fence and the next closing fence.
block=$(awk -v tag="readme-test:$backend" '
  inside && /^```/ { exit }
  inside { print }
  $0 == "```sh " tag { inside = 1 }
' "$readme")
if [ -z "$block" ]; then
  echo "try-backend: README.md has no \`\`\`sh readme-test:$backend block" >&2
  exit 1
fi

# The plugin refuses a socket or key directory that group or others can write.
(umask 077; mkdir -p "$dir")
cd "$dir"

# Every background job gets a process group of its own (pykmip-server forks), and the group is
# what cleanup stops.
set -m
cleanup() {
  local pid
  for pid in $(jobs -p); do kill -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 143' TERM INT

echo "try-backend: running README.md's readme-test:$backend block in $PWD" >&2
eval "$block"
echo "try-backend: $backend set up and tested in $PWD" >&2
if [ -t 0 ]; then
  read -r -p "The server and the plugin are running; press Enter to stop them. " _
fi

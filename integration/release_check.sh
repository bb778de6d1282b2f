#!/usr/bin/env bash
# CI check of the release tarball (scripts/release.sh, from the debug build CI already has):
# unpack it, verify SHA256SUMS (and that a changed file fails it), run --version and `check`
# on a local key from the unpacked binaries, and compare its deploy/ with the repository's.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

scripts/release.sh --debug "$work/dist"
tarball=$(ls "$work"/dist/kms-plugin-*-x86_64-linux-gnu.tar.gz)
(cd "$work/dist" && sha256sum -c --quiet "$(basename "$tarball").sha256")
mkdir "$work/x"
tar -xzf "$tarball" -C "$work/x"
root=$(echo "$work"/x/kms-plugin-*)
(cd "$root" && sha256sum -c --quiet --strict SHA256SUMS)
# Every file is listed: a file added without a checksum would go unchecked.
listed=$(cut -d' ' -f3- "$root/SHA256SUMS" | sort)
present=$(cd "$root" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort)
[ "$listed" = "$present" ] || { echo "SHA256SUMS does not list exactly the files in the tarball" >&2; exit 1; }
# The check can fail: one changed byte is caught.
cp -a "$root" "$work/tampered"
printf 'x' >> "$work/tampered/deploy/config.toml"
if (cd "$work/tampered" && sha256sum -c --quiet --strict SHA256SUMS >/dev/null 2>&1); then
  echo "SHA256SUMS did not catch a changed file" >&2; exit 1
fi
diff -r deploy "$root/deploy"

version=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json,sys; print([p for p in json.load(sys.stdin)["packages"] if p["name"]=="kms-plugin"][0]["version"])')
[ "$("$root/bin/kms-plugin" --version)" = "kms-plugin $version" ]
"$root/bin/kms-bench" --help >/dev/null
python3 - "$root/sbom.spdx.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
names = {p["name"] for p in doc["packages"]}
assert doc["spdxVersion"] == "SPDX-2.3", doc["spdxVersion"]
missing = {"kms-plugin", "tokio", "tonic", "ring", "rustls"} - names
assert not missing, f"SBOM lacks {missing}"
assert "proptest" not in names and "criterion" not in names, "dev-dependencies in the SBOM"
PY

# `check` from the tarball, on a local key, as an operator would run it first.
install -d -m 0700 "$work/host"
"$root/bin/kms-plugin" keygen --out "$work/host/root-1.key" >/dev/null
cat > "$work/host/config.toml" <<TOML
[socket]
path = "$work/host/kms.sock"
[metrics]
enabled = false
[backend]
type = "local"
current_key_file = "$work/host/root-1.key"
TOML
# Captured first: `| grep -q` exits at the match and the rest of the output meets a closed pipe.
checked=$("$root/bin/kms-plugin" check --config "$work/host/config.toml")
grep -q 'wrap/unwrap round trip succeeded' <<<"$checked"
echo "release tarball ok: $(basename "$tarball") $(du -k "$tarball" | cut -f1) KiB"

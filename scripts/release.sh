#!/usr/bin/env bash
# Builds the release tarball: what a host install needs (README "Install").
#
#   scripts/release.sh [--debug] OUTDIR
#
# OUTDIR/kms-plugin-VERSION-x86_64-linux-gnu.tar.gz holds kms-plugin-VERSION/ with
#   bin/kms-plugin, bin/kms-bench   stripped, for x86_64 Linux with glibc (Debian 12 or newer)
#   deploy/                         the manifests, systemd units and recipes, as in the repository
#   sbom.spdx.json                  the crates linked in (scripts/sbom.py, SPDX 2.3)
#   README.md, SECURITY.md
#   SHA256SUMS                      of every other file; check with `sha256sum -c SHA256SUMS`
# and OUTDIR/…tar.gz.sha256 of the tarball itself. --debug packs the debug build instead of a
# release build (a release build takes ~18 minutes here; CI checks the packing, not the
# optimiser). The tarball is reproducible: sorted, owned by 0:0, every mtime SOURCE_DATE_EPOCH
# (default: the last commit's time), gzip without a name or time. integration/release_check.sh
# unpacks it and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
if [ "${1:-}" = --debug ]; then profile=debug; shift; fi
[ $# -eq 1 ] || { echo "usage: $0 [--debug] OUTDIR" >&2; exit 2; }
outdir=$1

target=${CARGO_TARGET_DIR:-target}
if [ "$profile" = release ]; then
  cargo build --locked --release --bins --features cloud
else
  # --all-targets: the same feature set as `cargo test --all-targets` (dev-dependencies unify
  # features), so after CI's test run this reuses its build instead of recompiling dependencies.
  cargo build --locked --all-targets --features cloud
fi
# Only now: C build scripts (ring's cc) rebuild when SOURCE_DATE_EPOCH changes, and the build
# above should reuse what the test run compiled.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
version=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json,sys; print([p for p in json.load(sys.stdin)["packages"] if p["name"]=="kms-plugin"][0]["version"])')
name=kms-plugin-$version
tarball=$name-x86_64-linux-gnu.tar.gz

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/$name
install -d "$root/bin"
for b in kms-plugin kms-bench; do
  objcopy --strip-all "$target/$profile/$b" "$root/bin/$b"
  chmod 0755 "$root/bin/$b"
done
cp -r deploy "$root/deploy"
cp README.md SECURITY.md "$root/"
python3 scripts/sbom.py > "$root/sbom.spdx.json"
(cd "$root" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum > SHA256SUMS)

mkdir -p "$outdir"
tar -C "$work" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
  --mode='u+rwX,go+rX,go-w' -cf - "$name" | gzip -n -9 > "$outdir/$tarball"
(cd "$outdir" && sha256sum "$tarball" > "$tarball.sha256")
echo "$outdir/$tarball ($profile build, $(du -k "$outdir/$tarball" | cut -f1) KiB)"

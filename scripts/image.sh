#!/usr/bin/env bash
# Builds the kms-plugin container image offline with buildah: `FROM scratch`, no base image
# to pull, no daemon, nothing run inside the image (so no container runtime either).
#
#   scripts/image.sh [--debug] OUT
#
# OUT is an OCI image layout directory (push it with `skopeo copy oci:OUT docker://REGISTRY/...`
# or load it with `podman load`/`docker load` from `oci-archive`). --debug packs the debug build
# (what CI has already compiled) instead of a release build. The root filesystem is
# scripts/image-rootfs.sh's, which deploy/Dockerfile uses too.
#
# Reproducible: every timestamp is SOURCE_DATE_EPOCH (default: the last commit's time), the
# layer is written from files with that mtime, and buildah's own labels and history are left
# out, so two builds of one commit give the same digest (integration/image.sh checks it).
# Labels: the OCI annotations (org.opencontainers.image.*). The SBOM is inside, at
# /usr/share/doc/kms-plugin/sbom.spdx.json, and next to the layout as OUT.sbom.spdx.json.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
if [ "${1:-}" = --debug ]; then profile=debug; shift; fi
[ $# -eq 1 ] || { echo "usage: $0 [--debug] OUT" >&2; exit 2; }
out=$1
command -v buildah >/dev/null || { echo "buildah missing (apt-get install buildah)" >&2; exit 1; }

target=${CARGO_TARGET_DIR:-target}
if [ "$profile" = release ]; then
  cargo build --locked --release --bin kms-plugin --features cloud
else
  # As scripts/release.sh --debug: reuse what `cargo test --all-targets` built.
  cargo build --locked --all-targets --features cloud
fi
# Only now: C build scripts (ring's cc) rebuild when SOURCE_DATE_EPOCH changes, and the build
# above should reuse what the test run compiled.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
version=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json,sys; print([p for p in json.load(sys.stdin)["packages"] if p["name"]=="kms-plugin"][0]["version"])')
revision=$(git rev-parse HEAD)

work=$(mktemp -d)
trap 'buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs rm --all >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
python3 scripts/sbom.py > "$work/sbom.spdx.json"
scripts/image-rootfs.sh "$target/$profile/kms-plugin" "$work/sbom.spdx.json" "$work/rootfs"

# Private storage (vfs: no overlay mounts needed) that the trap removes: nothing is left in
# the machine's image store. BUILDAH_ISOLATION=chroot: no runtime is needed for copy/commit.
export BUILDAH_ISOLATION=chroot
b() { buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"; }
ctr=$(b from --quiet scratch)
b copy --quiet "$ctr" "$work/rootfs/" / >/dev/null
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
b config \
  --entrypoint '["/usr/local/bin/kms-plugin"]' \
  --cmd '["serve", "--config", "/etc/kms-plugin/config.toml"]' \
  --user 65532:65532 \
  --workingdir / \
  --env PATH=/usr/local/bin \
  --label org.opencontainers.image.title=kms-plugin \
  --label "org.opencontainers.image.description=Kubernetes KMS v2 encryption plugin" \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "org.opencontainers.image.created=$created" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label org.opencontainers.image.base.name=scratch \
  --label dev.kms-plugin.sbom=/usr/share/doc/kms-plugin/sbom.spdx.json \
  "$ctr"
# The OCI annotations go in the manifest too, where registries and scanners read them.
for a in title=kms-plugin "version=$version" "revision=$revision" "created=$created" licenses=Apache-2.0; do
  b config --annotation "org.opencontainers.image.$a" "$ctr"
done
rm -rf "$out"
b commit --quiet --format oci --timestamp "$SOURCE_DATE_EPOCH" --identity-label=false \
  --omit-history --disable-compression=false "$ctr" "oci:$out" >/dev/null
cp "$work/sbom.spdx.json" "$out.sbom.spdx.json"
digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$out/index.json")
echo "image $out digest $digest ($profile build, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"

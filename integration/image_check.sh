#!/usr/bin/env bash
# CI check of the container image (scripts/image.sh, from the debug build CI already has).
# Containers cannot run here, so the image is checked by what it contains and by running it the
# way a runtime would, minus the runtime: its layers unpacked into a root filesystem, then
# `serve` on the local backend in a chroot as uid 65532:0 (the manifest's user) and `status`
# over the socket, both the image's own binary. Also: two builds give the same digest, the OCI
# labels and the SBOM are there, there is no shell, and the image stays under its size bound.
set -euo pipefail
cd "$(dirname "$0")/.."
# Compressed image size bound, MiB: measured 11.6 MiB from the debug build (README "Container
# image"); the bound leaves room for growth but catches a base image or debug info slipping in.
max_mib=${KMS_IMAGE_MAX_MIB:-16}
work=$(mktemp -d)
pid=
cleanup() {
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

scripts/image.sh --debug "$work/a"
scripts/image.sh --debug "$work/b"
digest() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$1/index.json"; }
[ "$(digest "$work/a")" = "$(digest "$work/b")" ] ||
  { echo "two builds differ: $(digest "$work/a") vs $(digest "$work/b")" >&2; exit 1; }

# Manifest, config, layers: labels, user, entrypoint; the size of what a node pulls.
python3 - "$work/a" "$max_mib" > "$work/layers" <<'PY'
import json, os, sys
layout, max_mib = sys.argv[1], float(sys.argv[2])
blob = lambda d: os.path.join(layout, "blobs", *d.split(":"))
manifest = json.load(open(blob(json.load(open(os.path.join(layout, "index.json")))["manifests"][0]["digest"])))
config = json.load(open(blob(manifest["config"]["digest"])))
labels = config["config"].get("Labels", {})
for key in ("title", "version", "revision", "created", "licenses"):
    assert labels.get(f"org.opencontainers.image.{key}"), f"label org.opencontainers.image.{key} missing: {labels}"
    assert manifest.get("annotations", {}).get(f"org.opencontainers.image.{key}"), f"annotation {key} missing"
assert config["config"]["User"] == "65532:65532", config["config"]["User"]
assert config["config"]["Entrypoint"] == ["/usr/local/bin/kms-plugin"], config["config"]
size = sum(l["size"] for l in manifest["layers"]) + manifest["config"]["size"]
assert size <= max_mib * 2**20, f"image is {size / 2**20:.1f} MiB, over the {max_mib} MiB bound"
print(f"size {size / 2**20:.1f}", file=sys.stderr)
for l in manifest["layers"]:
    print(blob(l["digest"]))
PY
mkdir "$work/rootfs"
while read -r layer; do tar -xf "$layer" -C "$work/rootfs"; done < "$work/layers"
rootfs=$work/rootfs

for shell in bin/sh bin/bash usr/bin/sh usr/bin/bash bin/busybox; do
  [ ! -e "$rootfs/$shell" ] || { echo "the image has a shell: /$shell" >&2; exit 1; }
done
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert any(p["name"]=="tokio" for p in d["packages"])' \
  "$rootfs/usr/share/doc/kms-plugin/sbom.spdx.json"
grep -q '^nonroot:x:65532:' "$rootfs/etc/passwd"
[ -s "$rootfs/etc/ssl/certs/ca-certificates.crt" ]

# The host side of the manifest: a key and a config mounted in, the socket directory owned by
# 65532 (here created inside the unpacked root instead of mounted).
install -d -m 0750 -o 65532 -g 0 "$rootfs/etc/kms-plugin/keys" "$rootfs/var/run/kmsplugin"
chroot --userspec=65532:0 "$rootfs" /usr/local/bin/kms-plugin keygen --out /etc/kms-plugin/keys/root-1.key >/dev/null
cat > "$rootfs/etc/kms-plugin/config.toml" <<'TOML'
[socket]
path = "/var/run/kmsplugin/kms.sock"
mode = "0660"
group = "0"
[metrics]
enabled = false
[backend]
type = "local"
current_key_file = "/etc/kms-plugin/keys/root-1.key"
TOML
chroot --userspec=65532:0 "$rootfs" /usr/local/bin/kms-plugin serve --config /etc/kms-plugin/config.toml \
  > "$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -S "$rootfs/var/run/kmsplugin/kms.sock" ] && break; sleep 0.1; done
chroot --userspec=65532:0 "$rootfs" /usr/local/bin/kms-plugin status --socket /var/run/kmsplugin/kms.sock |
  grep -q 'healthz=ok' || { cat "$work/serve.log" >&2; exit 1; }
[ "$(stat -c %u "/proc/$pid")" = 65532 ] || { echo "serve is not running as 65532" >&2; exit 1; }
kill "$pid"; wait "$pid" || true; pid=
[ ! -e "$rootfs/var/run/kmsplugin/kms.sock" ] || { echo "socket left behind" >&2; exit 1; }
echo "image ok: digest $(digest "$work/a"), reproducible, $(du -sk "$work/rootfs" | cut -f1) KiB unpacked"

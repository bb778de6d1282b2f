#!/usr/bin/env bash
# Lays out the container image's root filesystem in OUTDIR: the one layout both image builds
# ship. scripts/image.sh (buildah, offline, what CI builds and tests) copies OUTDIR into a
# `scratch` image; deploy/Dockerfile's last stage runs this same script and copies its output
# into `FROM scratch`, so the two cannot drift apart: change the layout here, nowhere else.
#
#   scripts/image-rootfs.sh BINARY SBOM OUTDIR
#
# Contents: the stripped binary at /usr/local/bin/kms-plugin; the shared libraries it links
# (glibc, libgcc_s: ldd's list, nothing else); /etc/passwd and /etc/group naming root and
# nonroot (65532, distroless's "nonroot"); the CA bundle (AWS KMS, Vault, KMIP over TLS); the
# SBOM at /usr/share/doc/kms-plugin/sbom.spdx.json. No shell, no package manager. A PKCS#11
# vendor library and what it links must be mounted in from the host.
# Every file's mtime is SOURCE_DATE_EPOCH (default 0), so the layout is byte-for-byte
# reproducible.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 BINARY SBOM OUTDIR" >&2; exit 2; }
bin=$1 sbom=$2 out=$3
epoch=${SOURCE_DATE_EPOCH:-0}
ca=/etc/ssl/certs/ca-certificates.crt   # Debian's ca-certificates
[ -f "$ca" ] || { echo "$ca missing: install ca-certificates" >&2; exit 1; }
[ ! -e "$out" ] || [ -z "$(ls -A "$out")" ] || { echo "$out is not empty" >&2; exit 1; }

install -d -m 0755 "$out"/usr/local/bin "$out"/etc/ssl/certs "$out"/usr/share/doc/kms-plugin
# Stripped: symbols are most of the binary, and panics still name their source location.
objcopy --strip-all "$bin" "$out"/usr/local/bin/kms-plugin
chmod 0755 "$out"/usr/local/bin/kms-plugin

# The dynamic loader and each library ldd resolves, at the same path (the binary's
# PT_INTERP and the loader's search path then work unchanged).
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' | sort -u | while read -r lib; do
  install -D -m 0755 "$(readlink -f "$lib")" "$out$lib"
done
# /lib64 and /lib are symlinks on Debian (usrmerge): keep that shape.
for link in lib lib64; do
  if [ -L "/$link" ] && [ -d "$out/$link" ]; then
    install -d "$out/usr/$link"
    cp -a "$out/$link/." "$out/usr/$link/" && rm -rf "${out:?}/$link"
    ln -s "usr/$link" "$out/$link"
  fi
done

printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
  'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' > "$out"/etc/passwd
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' > "$out"/etc/group
chmod 0644 "$out"/etc/passwd "$out"/etc/group
install -m 0644 "$ca" "$out"/etc/ssl/certs/ca-certificates.crt
install -m 0644 "$sbom" "$out"/usr/share/doc/kms-plugin/sbom.spdx.json

# Mount points the manifest uses (a read-only root cannot get them created at run time).
install -d -m 0755 "$out"/etc/kms-plugin "$out"/var/run/kmsplugin "$out"/tmp
chmod 1777 "$out"/tmp

chown -R 0:0 "$out"
find "$out" -exec touch -h -d "@$epoch" {} +

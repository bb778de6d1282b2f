#!/usr/bin/env python3
"""A small emulation of Google Cloud KMS's REST API, for the plugin's tests only.

No emulator of Cloud KMS exists in any registry this project can reach, so this one was written
from Google's public REST reference (cloudkms.googleapis.com v1: cryptoKeys.get, .encrypt and
.decrypt; the CryptoKey, CryptoKeyVersion and error JSON shapes; CRC32C integrity fields) and
the token endpoints the Google Rust SDK reaches: self-signed service-account JWTs (verified here
with the account's public key), the metadata server's token endpoint (GCE_METADATA_HOST), and
STS token exchange for workload identity federation (`token_url` in an external_account file).
It is deliberately small; a shape it gets wrong would hide a real bug, which is why the README
says the gcp backend is verified against this emulation, not against the live service.

Real cryptography: AES-256-GCM per key version, with the request's additional authenticated
data; real CRC32C (Castagnoli). State (keys, versions, their states, issued tokens) lives in
STATE_DIR/state.json, so a restart on the same port keeps the keys.

Usage: gcp_kms.py STATE_DIR PORT MDS_PORT
  Serves HTTPS on 127.0.0.1:PORT (KMS and STS) with a certificate signed by STATE_DIR/ca.pem,
  and plain HTTP on 127.0.0.1:MDS_PORT (the metadata server, and /admin/* for the tests).
  Writes STATE_DIR/service-account.json on first start.
"""

import base64
import datetime
import json
import os
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

STATE_DIR, PORT, MDS_PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
LOCK = threading.Lock()
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
SEEN_JWTS = set()
CALLS = {"encrypt": 0, "decrypt": 0, "get": 0, "token": 0}


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def path(name):
    return os.path.join(STATE_DIR, name)


def load_state():
    try:
        with open(path("state.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"keys": {}, "tokens": [], "denied": False}


STATE = load_state()


def save_state():
    tmp = path("state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(STATE, f)
    os.replace(tmp, path("state.json"))


def write_private(name, data):
    fd = os.open(path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_pki():
    """A CA and a server certificate for 127.0.0.1, once per state directory."""
    if os.path.exists(path("server.pem")):
        return
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gcp-kms-emulator test CA")])
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    end = start + datetime.timedelta(days=2)
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    import ipaddress
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    with open(path("ca.pem"), "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    write_private("server-key.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(path("server.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def make_service_account():
    if os.path.exists(path("service-account.json")):
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    account = {
        "type": "service_account",
        "project_id": "kms-plugin-test",
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": "kms-plugin@kms-plugin-test.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": f"https://127.0.0.1:{PORT}/token",
        "universe_domain": "googleapis.com",
    }
    write_private("service-account.json", json.dumps(account).encode())


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def valid_jwt(token):
    """A self-signed service-account JWT: RS256 by the account's key, for the KMS scope."""
    try:
        head, body, sig = token.split(".")
        header, claims = json.loads(b64d(head)), json.loads(b64d(body))
        with open(path("service-account.json")) as f:
            account = json.load(f)
        public = serialization.load_pem_private_key(account["private_key"].encode(), None).public_key()
        public.verify(b64d(sig), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except (ValueError, KeyError, InvalidSignature, OSError):
        return False
    scoped = SCOPE in (claims.get("scope") or "").split() or claims.get("aud") == "https://cloudkms.googleapis.com/"
    return (header.get("alg") == "RS256" and header.get("kid") == account["private_key_id"]
            and claims.get("iss") == account["client_email"] and claims.get("exp", 0) > time.time() and scoped)


def issue(prefix):
    token = prefix + secrets.token_urlsafe(32)
    with LOCK:
        STATE["tokens"].append(token)
        save_state()
    with open(path("tokens.txt"), "a") as f:
        f.write(token + "\n")
    return token


def version_json(key_name, vid, v):
    return {
        "name": f"{key_name}/cryptoKeyVersions/{vid}",
        "state": v["state"],
        "protectionLevel": "SOFTWARE",
        "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION",
        "createTime": v["created"],
        "generateTime": v["created"],
    }


def key_json(key_name, k):
    out = {
        "name": key_name,
        "purpose": "ENCRYPT_DECRYPT",
        "createTime": k["created"],
        "versionTemplate": {"protectionLevel": "SOFTWARE", "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"},
        "destroyScheduledDuration": "86400s",
    }
    if k.get("primary"):
        out["primary"] = version_json(key_name, k["primary"], k["versions"][k["primary"]])
    return out


class ApiError(Exception):
    STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
              404: "NOT_FOUND"}

    def __init__(self, http, message, status=None):
        super().__init__(message)
        self.http, self.message = http, message
        self.status = status or self.STATUS.get(http, "INTERNAL")


def new_version(k):
    vid = str(len(k["versions"]) + 1)
    k["versions"][vid] = {"material": secrets.token_hex(32), "state": "ENABLED", "created": now_rfc3339()}
    k["primary"] = vid
    return vid


def crc_field(body, data_field, crc_field_name):
    data = base64.b64decode(body.get(data_field, ""))
    if crc_field_name in body:
        if int(body[crc_field_name]) != crc32c(data):
            raise ApiError(400, f"The checksum in field {crc_field_name} did not match the data in field {data_field}.")
        return data, True
    return data, False


def find_key(name):
    k = STATE["keys"].get(name)
    if k is None:
        raise ApiError(404, f"{name} not found.")
    return k


def encrypt(name, body):
    CALLS["encrypt"] += 1
    key_name, _, vid = name.partition("/cryptoKeyVersions/")
    k = find_key(key_name)
    vid = vid or k.get("primary")
    v = k["versions"].get(vid or "")
    if v is None:
        raise ApiError(404, f"{name} not found.")
    full = f"{key_name}/cryptoKeyVersions/{vid}"
    if v["state"] != "ENABLED":
        raise ApiError(400, f"{full} is not enabled, current state is: {v['state']}.", "FAILED_PRECONDITION")
    plaintext, p_ok = crc_field(body, "plaintext", "plaintextCrc32c")
    aad, a_ok = crc_field(body, "additionalAuthenticatedData", "additionalAuthenticatedDataCrc32c")
    nonce = secrets.token_bytes(12)
    ct = int(vid).to_bytes(4, "big") + nonce + AESGCM(bytes.fromhex(v["material"])).encrypt(nonce, plaintext, aad)
    crc = crc32c(ct)
    if STATE.get("corrupt"):
        # A bit flipped on the way back: the checksum is the one the service computed.
        ct = ct[:-1] + bytes([ct[-1] ^ 1])
    return {"name": full, "ciphertext": base64.b64encode(ct).decode(), "ciphertextCrc32c": str(crc),
            "verifiedPlaintextCrc32c": p_ok, "verifiedAdditionalAuthenticatedDataCrc32c": a_ok,
            "protectionLevel": "SOFTWARE"}


def decrypt(name, body):
    CALLS["decrypt"] += 1
    if "/cryptoKeyVersions/" in name:
        raise ApiError(400, "Decrypt takes a CryptoKey name, not a version.")
    k = find_key(name)
    ct, _ = crc_field(body, "ciphertext", "ciphertextCrc32c")
    aad, _ = crc_field(body, "additionalAuthenticatedData", "additionalAuthenticatedDataCrc32c")
    vid = str(int.from_bytes(ct[:4], "big")) if len(ct) > 16 else ""
    v = k["versions"].get(vid)
    if v is None:
        raise ApiError(400, "Decryption failed: verify that 'name' refers to the correct CryptoKey.")
    if v["state"] != "ENABLED":
        full = f"{name}/cryptoKeyVersions/{vid}"
        raise ApiError(400, f"{full} is not enabled, current state is: {v['state']}.", "FAILED_PRECONDITION")
    try:
        plaintext = AESGCM(bytes.fromhex(v["material"])).decrypt(ct[4:16], ct[16:], aad)
    except InvalidTag:
        raise ApiError(400, "Decryption failed: verify that 'name' refers to the correct CryptoKey.")
    return {"plaintext": base64.b64encode(plaintext).decode(), "plaintextCrc32c": str(crc32c(plaintext)),
            "usedPrimary": vid == k.get("primary"), "protectionLevel": "SOFTWARE"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        if os.environ.get("GCP_EMULATOR_DEBUG"):
            sys.stderr.write("gcp-emulator: " + (fmt % args) + "\n")

    def reply(self, code, obj, ctype="application/json"):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def authorized(self):
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False
        token = auth[len("Bearer "):]
        with LOCK:
            if token in STATE["tokens"]:
                return True
        if valid_jwt(token):
            # Bearer credentials the tests' log scans look for.
            with LOCK:
                if token not in SEEN_JWTS:
                    SEEN_JWTS.add(token)
                    with open(path("tokens.txt"), "a") as f:
                        f.write(token + "\n")
            return True
        return False

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        url = urllib.parse.urlsplit(self.path)
        raw = self.body()
        try:
            if self.server.server_port == MDS_PORT:
                if url.path.startswith("/admin/"):
                    return self.admin(url.path, urllib.parse.parse_qs(url.query), raw)
                return self.metadata(url)
            if url.path in ("/v1/token", "/token"):
                return self.sts(raw)
            if not url.path.startswith("/v1/"):
                raise ApiError(404, "no such method")
            if not self.authorized():
                raise ApiError(401, "Request had invalid authentication credentials. Expected OAuth 2 access token.")
            name, _, verb = url.path[len("/v1/"):].partition(":")
            name = urllib.parse.unquote(name)
            with LOCK:
                if STATE["denied"]:
                    raise ApiError(403, f"Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied on resource '{name}' (or it may not exist).")
                if method == "GET" and not verb:
                    CALLS["get"] += 1
                    return self.reply(200, key_json(name, find_key(name)))
                body = json.loads(raw or b"{}")
                if method == "POST" and verb == "encrypt":
                    return self.reply(200, encrypt(name, body))
                if method == "POST" and verb == "decrypt":
                    return self.reply(200, decrypt(name, body))
            raise ApiError(404, "no such method")
        except ApiError as e:
            self.reply(e.http, {"error": {"code": e.http, "message": e.message, "status": e.status}})
        except (ValueError, KeyError) as e:
            self.reply(400, {"error": {"code": 400, "message": f"Invalid JSON payload: {type(e).__name__}", "status": "INVALID_ARGUMENT"}})

    def metadata(self, url):
        if self.headers.get("Metadata-Flavor") != "Google":
            return self.reply(403, b"Missing Metadata-Flavor:Google header.", "text/plain")
        p = url.path
        if p.startswith("/computeMetadata/v1/instance/service-accounts/default/token"):
            CALLS["token"] += 1
            return self.reply(200, {"access_token": issue("mds-"), "expires_in": 3599, "token_type": "Bearer"})
        if p == "/computeMetadata/v1/universe/universe-domain":
            return self.reply(200, b"googleapis.com", "text/plain")
        if p == "/computeMetadata/v1/project/project-id":
            return self.reply(200, b"kms-plugin-test", "text/plain")
        if p.startswith("/computeMetadata/v1/instance/service-accounts/default/email"):
            return self.reply(200, b"default@kms-plugin-test.iam.gserviceaccount.com", "text/plain")
        if p in ("/", "/computeMetadata/v1/", "/computeMetadata/v1"):
            return self.reply(200, b"", "text/plain")
        return self.reply(404, b"not found", "text/plain")

    def sts(self, raw):
        form = urllib.parse.parse_qs(raw.decode())
        want = open(path("subject-token")).read().strip() if os.path.exists(path("subject-token")) else None
        got = form.get("subject_token", [""])[0]
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:token-exchange"] or not want or got != want:
            return self.reply(400, {"error": "invalid_grant", "error_description": "The subject token is invalid."})
        CALLS["token"] += 1
        return self.reply(200, {"access_token": issue("sts-"), "issued_token_type":
                                "urn:ietf:params:oauth:token-type:access_token", "token_type": "Bearer",
                                "expires_in": 3600})

    def admin(self, p, q, raw):
        arg = lambda k: q.get(k, [""])[0]
        with LOCK:
            if p == "/admin/create":
                k = STATE["keys"].setdefault(arg("key"), {"versions": {}, "created": now_rfc3339()})
                vid = new_version(k)
            elif p == "/admin/rotate":
                vid = new_version(find_key(arg("key")))
            elif p == "/admin/state":
                key_name, _, vid = arg("version").partition("/cryptoKeyVersions/")
                find_key(key_name)["versions"][vid]["state"] = arg("state")
            elif p == "/admin/deny":
                STATE["denied"], vid = True, ""
            elif p == "/admin/allow":
                STATE["denied"], vid = False, ""
            elif p == "/admin/corrupt":
                STATE["corrupt"], vid = arg("on") == "1", ""
            elif p == "/admin/calls":
                return self.reply(200, CALLS)
            elif p == "/admin/unwrap":
                # What the key's administrator could do: the plaintext under a version.
                key_name, _, vid = arg("version").partition("/cryptoKeyVersions/")
                v = find_key(key_name)["versions"][vid]
                kek = AESGCM(bytes.fromhex(v["material"])).decrypt(raw[4:16], raw[16:], arg("version").encode())
                return self.reply(200, kek.hex().encode(), "text/plain")
            else:
                raise ApiError(404, "no such admin method")
            save_state()
        self.reply(200, {"version": f"{arg('key')}/cryptoKeyVersions/{vid}" if arg("key") else vid})


def serve(port, tls):
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(path("server.pem"), path("server-key.pem"))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    return server


if __name__ == "__main__":
    os.makedirs(STATE_DIR, exist_ok=True)
    make_pki()
    make_service_account()
    mds = serve(MDS_PORT, tls=False)
    threading.Thread(target=mds.serve_forever, daemon=True).start()
    kms = serve(PORT, tls=True)
    with open(path("ready"), "w") as f:
        f.write(str(os.getpid()))
    kms.serve_forever()

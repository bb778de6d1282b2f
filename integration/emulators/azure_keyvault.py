#!/usr/bin/env python3
"""A small Azure Key Vault / Managed HSM emulation, for the plugin's tests only.

This is NOT Azure. It is an emulation written from Microsoft's public REST reference (Key Vault
keys API: get key, wrap key, unwrap key; the error body `{"error": {"code", "message",
"innererror"}}`; the challenge-based bearer authentication of Key Vault), the Microsoft identity
platform's token endpoint (`/{tenant}/oauth2/v2.0/token`: client secret, client assertion signed
with a certificate, federated token of workload identity) and App Service's managed-identity
endpoint (`IDENTITY_ENDPOINT` + `x-identity-header`). It is kept small: only what the plugin's
backend calls, with real cryptography (RSA-OAEP-256 from `cryptography`, and A256KW for the
Managed HSM mode), so the backend is tested against the documented shapes, not against the live
service. Where it guesses (exact messages, inner error codes for an expired key) it says so.

One HTTPS server on 127.0.0.1 answers every route; the test reaches the vault as
`kv.vault.azure.net:<port>` (the plugin's `vault_ip` maps the name to 127.0.0.1) so Key Vault's
challenge resource check (`*.vault.azure.net`) runs as in production.

State (keys, versions, issued tokens, denial, counters) lives in `<dir>/state.json`, read and
written under a lock by every request, so the server can be stopped and started again with its
keys, and the admin subcommands change it from the outside:

  azure_keyvault.py init  --dir D [--hsm]        CA, TLS and client credentials, key `k` v1
  azure_keyvault.py serve --dir D --port P
  azure_keyvault.py admin --dir D rotate|disable|enable|expire [VERSION]|create NAME|deny|allow|counters
  azure_keyvault.py admin --dir D unwrap KID B64URL   (the administrator's unwrap, for tests)
  azure_keyvault.py admin --dir D hostile MODE   (answers no vault gives; MODE off ends it):
      short-kek, huge, proxy-403      a short unwrapped KEK, an oversized answer, a proxy's page
      gateway-401                     an API gateway's `{"statusCode": 401}` before the vault
      kv-401                          Key Vault's own 401 (AKV10000, as when a proxy drops the bearer)
      echo                            wrapKey/unwrapKey fail echoing the request (JSON message,
                                      then a text body); what was echoed goes to <dir>/echoed.txt
      echo-token                      the token endpoint fails echoing the form (client secret or
                                      assertion) in error_description; echoed.txt as above
      slow-older                      a get of any version but the newest answers after 3 s
"""

import argparse
import base64
import datetime
import fcntl
import hashlib
import http.server
import json
import os
import secrets
import ssl
import sys
import time
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap, InvalidUnwrap
from cryptography.x509.oid import NameOID

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
KEY = "k"
MAX_BODY = 64 * 1024


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- state -------------------------------------------------------------------------------------


class State:
    """state.json under an exclusive lock: `with State(dir) as s: s.data[...]`."""

    def __init__(self, d):
        self.dir = d
        self.path = os.path.join(d, "state.json")

    def __enter__(self):
        self.lock = open(os.path.join(self.dir, "state.lock"), "a")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        with open(self.path) as f:
            self.data = json.load(f)
        return self

    def __exit__(self, *exc):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()


def new_version(data, name=KEY):
    """A new version of key `name` (RSA 2048, or a 256-bit oct-HSM key on a Managed HSM)."""
    version = secrets.token_hex(16)
    if data["hsm"]:
        material = {"kty": "oct-HSM", "k": b64u(os.urandom(32))}
    else:
        pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        material = {"kty": "RSA", "pem": pem.decode()}
    now = int(time.time())
    data["keys"].setdefault(name, []).append(
        {"version": version, "enabled": True, "created": now, "updated": now, **material}
    )
    return version


# --- init --------------------------------------------------------------------------------------


def write(path, data, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def cert(subject, key, issuer, issuer_key, sans=None, ca=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        import ipaddress

        names = [x509.DNSName(s) if not s[0].isdigit() else x509.IPAddress(ipaddress.ip_address(s)) for s in sans]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def pem_key(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init(d, hsm):
    from cryptography.hazmat.primitives.asymmetric import ec

    os.makedirs(d, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("azure-emulator-ca", ca_key, "azure-emulator-ca", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = cert("kv", server_key, "azure-emulator-ca", ca_key,
                  sans=["kv.vault.azure.net", "kv.managedhsm.azure.net", "127.0.0.1", "localhost"])
    write(os.path.join(d, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM), 0o644)
    write(os.path.join(d, "server.pem"), server.public_bytes(serialization.Encoding.PEM), 0o644)
    write(os.path.join(d, "server.key"), pem_key(server_key))
    # The application's credentials: a client secret, a certificate (RSA, as Entra ID requires),
    # a federated token (what the kubelet projects for workload identity), the identity header.
    client_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client = cert("kms-plugin", client_key, "kms-plugin", client_key)
    write(os.path.join(d, "client.pem"), client.public_bytes(serialization.Encoding.PEM), 0o644)
    write(os.path.join(d, "client.key"), pem_key(client_key))
    secret = "cs~" + secrets.token_urlsafe(30)
    write(os.path.join(d, "client-secret"), secret + "\n")
    federated = "eyJ" + secrets.token_urlsafe(60)
    write(os.path.join(d, "federated-token"), federated)
    identity_header = secrets.token_hex(20)
    write(os.path.join(d, "identity-header"), identity_header)
    data = {
        "hsm": hsm,
        "tenant": TENANT,
        "client_id": CLIENT_ID,
        "client_secret": secret,
        "client_cert_sha1": b64u(hashlib.sha1(client.public_bytes(serialization.Encoding.DER)).digest()),
        "client_cert_sha256": b64u(hashlib.sha256(client.public_bytes(serialization.Encoding.DER)).digest()),
        "federated_token": federated,
        "identity_header": identity_header,
        "tokens": {},
        "denied": False,
        "keys": {},
        "counters": {"wrapkey": 0, "unwrapkey": 0, "get": 0, "token": 0},
    }
    new_version(data)
    write(os.path.join(d, "state.json"), json.dumps(data))


# --- the server --------------------------------------------------------------------------------


class Reply(Exception):
    def __init__(self, status, body, headers=None):
        self.status, self.body, self.headers = status, body, headers or {}


def kv_error(status, code, message, inner=None):
    err = {"code": code, "message": message}
    if inner:
        err["innererror"] = {"code": inner}
    return Reply(status, {"error": err})


def entra_error(status, error, code, description):
    # The identity platform's error body (RFC 6749 plus error_codes).
    return Reply(status, {"error": error, "error_description": f"AADSTS{code}: {description}",
                          "error_codes": [code]})


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        if os.environ.get("AZURE_EMULATOR_VERBOSE"):
            sys.stderr.write("emulator: " + fmt % args + "\n")

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def handle_any(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self.send(413, {"error": {"code": "RequestTooLarge", "message": "too large"}})
        body = self.rfile.read(length) if length else b""
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        self.delay(method, url.path)
        try:
            with State(self.server.dir) as s:
                self.route(s.data, method, url.path, query, body)
        except Reply as r:
            self.send(r.status, r.body, r.headers)
        except Exception as e:  # an emulator bug must not look like a verdict
            self.send(500, {"error": {"code": "InternalError", "message": repr(e)}})

    def delay(self, method, path):
        """slow-older: waits (outside the state lock, so other requests go on) before answering
        a get of an older version."""
        with State(self.server.dir) as s:
            data = s.data
        parts = [p for p in path.split("/") if p]
        if data.get("hostile") != "slow-older" or method != "GET" or len(parts) != 3 or parts[0] != "keys":
            return
        versions = data["keys"].get(parts[1]) or []
        if versions and parts[2] != versions[-1]["version"]:
            time.sleep(3)

    def send(self, status, body, headers=None):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if raw:
            kind = "text/html" if isinstance(body, bytes) else "application/json; charset=utf-8"
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def route(self, data, method, path, query, body):
        parts = [p for p in path.split("/") if p]
        if method == "POST" and len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            return self.token(data, parts[0], body)
        if method == "GET" and parts == ["msi", "token"]:
            return self.msi(data, query)
        if parts and parts[0] == "keys":
            return self.keys(data, method, parts[1:], query, body)
        raise kv_error(404, "NotFound", "no such route")

    # Token endpoints.

    def issue(self, data, identity, resource):
        token = "kvemu." + secrets.token_urlsafe(32)
        data["tokens"][token] = {"identity": identity, "resource": resource, "exp": int(time.time()) + 3600}
        data["counters"]["token"] += 1
        # Every token issued, for the tests' log scans.
        with open(os.path.join(self.server.dir, "tokens.txt"), "a") as f:
            f.write(token + "\n")
        return token

    def echoed(self, values):
        """Records what a hostile mode echoed (base64url, one a line), for the tests' log scans."""
        with open(os.path.join(self.server.dir, "echoed.txt"), "a") as f:
            for v in values:
                f.write(b64u(v) + "\n")

    def token(self, data, tenant, body):
        form = dict(urllib.parse.parse_qsl(body.decode()))
        if data.get("hostile") == "echo-token":
            sent = [form[k] for k in ("client_secret", "client_assertion") if form.get(k)]
            self.echoed([v.encode() for v in sent])
            raise entra_error(400, "invalid_request", 900144, f"Malformed request: {body.decode()}")
        if tenant != data["tenant"]:
            raise entra_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            raise entra_error(400, "unsupported_grant_type", 70003, "grant type not supported.")
        scope = form.get("scope", "")
        if not scope.endswith("/.default"):
            raise entra_error(400, "invalid_scope", 1002012, "The provided value for scope is not valid.")
        if form.get("client_id") != data["client_id"]:
            raise entra_error(400, "unauthorized_client", 700016, "Application not found in the directory.")
        if "client_secret" in form:
            if not secrets.compare_digest(form["client_secret"], data["client_secret"]):
                raise entra_error(401, "invalid_client", 7000215, "Invalid client secret provided.")
            identity = "client-secret"
        elif form.get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            identity = self.assertion(data, tenant, form.get("client_assertion", ""))
        else:
            raise entra_error(400, "invalid_request", 900144, "The request body must contain client_secret or client_assertion.")
        token = self.issue(data, identity, scope[: -len("/.default")])
        raise Reply(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token})

    def assertion(self, data, tenant, jwt):
        # Workload identity: the federated token itself (Entra ID checks its issuer and subject
        # against the federated credential; the emulation compares it with the one it wrote).
        if secrets.compare_digest(jwt, data["federated_token"]):
            return "workload-identity"
        try:
            head, claims, sig = jwt.split(".")
            header = json.loads(unb64u(head))
            payload = json.loads(unb64u(claims))
        except Exception:
            raise entra_error(400, "invalid_client", 50027, "JWT token is invalid or malformed.")
        if header.get("alg") != "RS256":
            raise entra_error(400, "invalid_client", 5002738, "Invalid JWT token. 'RS256' is required.")
        if header.get("x5t") != data["client_cert_sha1"] and header.get("x5t#S256") != data["client_cert_sha256"]:
            raise entra_error(401, "invalid_client", 700027, "Client assertion contains an invalid signature (unknown key).")
        with open(os.path.join(self.server.dir, "client.pem"), "rb") as f:
            public = x509.load_pem_x509_certificate(f.read()).public_key()
        try:
            public.verify(unb64u(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except Exception:
            raise entra_error(401, "invalid_client", 700027, "Client assertion contains an invalid signature.")
        now = time.time()
        audience = f"https://{self.headers.get('Host')}/{tenant}/oauth2/v2.0/token"
        if payload.get("aud") != audience:
            raise entra_error(401, "invalid_client", 700212, "No matching federated identity record found for presented assertion audience.")
        if payload.get("iss") != data["client_id"] or payload.get("sub") != data["client_id"]:
            raise entra_error(401, "invalid_client", 700023, "Client assertion audience claim does not match.")
        if not (payload.get("nbf", 0) - 300 <= now < payload.get("exp", 0)):
            raise entra_error(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")
        return "client-certificate"

    def msi(self, data, query):
        # App Service's managed-identity protocol (2019-08-01), which azure_identity uses when
        # IDENTITY_ENDPOINT and IDENTITY_HEADER are set.
        if not secrets.compare_digest(self.headers.get("x-identity-header", ""), data["identity_header"]):
            raise Reply(401, {"statusCode": 401, "message": "Unauthorized."})
        if query.get("api-version") != "2019-08-01" or not query.get("resource"):
            raise Reply(400, {"statusCode": 400, "message": "Invalid request."})
        token = self.issue(data, "managed-identity", query["resource"].rstrip("/"))
        raise Reply(200, {"access_token": token, "expires_on": str(int(time.time()) + 3600),
                          "resource": query["resource"], "token_type": "Bearer",
                          "client_id": data["client_id"]})

    # Key Vault.

    def challenge(self, data):
        resource = "https://managedhsm.azure.net" if data["hsm"] else "https://vault.azure.net"
        value = f'Bearer authorization="https://login.microsoftonline.com/{data["tenant"]}", resource="{resource}"'
        return Reply(401, {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}},
                     {"WWW-Authenticate": value})

    def keys(self, data, method, parts, query, body):
        auth = self.headers.get("Authorization", "")
        token = data["tokens"].get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None
        if token is None or token["exp"] < time.time():
            raise self.challenge(data)
        expected = "https://managedhsm.azure.net" if data["hsm"] else "https://vault.azure.net"
        if token["resource"] != expected:
            raise kv_error(401, "Unauthorized", "AKV10022: Invalid audience.")
        if "api-version" not in query:
            raise kv_error(400, "BadParameter", "The 'api-version' query parameter is missing.")
        if not parts:
            raise kv_error(404, "NotFound", "no such route")
        hostile = data.get("hostile")
        if hostile == "proxy-403":
            raise Reply(403, b"<html><body>403 Forbidden (a proxy's page)</body></html>")
        if hostile == "huge":
            raise Reply(200, {"kid": "x", "value": "AAAA", "padding": "x" * 100_000})
        if hostile == "gateway-401":
            raise Reply(401, {"statusCode": 401, "message": "Access denied due to invalid subscription key."})
        if hostile == "kv-401":
            raise kv_error(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
        name, rest = parts[0], parts[1:]
        op = "get"
        if rest and rest[-1] in ("wrapkey", "unwrapkey"):
            op, rest = rest[-1], rest[:-1]
        if (op == "get") != (method == "GET"):
            raise kv_error(405, "MethodNotAllowed", "method not allowed")
        versions = data["keys"].get(name)
        if not versions:
            raise kv_error(404, "KeyNotFound", f"A key with (name/id) {name} was not found in this key vault.")
        version = rest[0] if rest else ""
        found = versions[-1] if not version else next((v for v in versions if v["version"] == version), None)
        if found is None:
            raise kv_error(404, "KeyNotFound", f"A key with (name/id) {name}/{version} was not found in this key vault.")
        if data["denied"]:
            action = {"get": "read", "wrapkey": "wrap/action", "unwrapkey": "unwrap/action"}[op]
            raise kv_error(403, "Forbidden",
                           f"Caller is not authorized to perform action on resource. Action: 'Microsoft.KeyVault/vaults/keys/{action}'",
                           "ForbiddenByRbac")
        data["counters"][op] += 1
        kid = f"https://{self.headers.get('Host')}/keys/{name}/{found['version']}"
        if op == "get":
            raise Reply(200, self.bundle(data, kid, found))
        try:
            request = json.loads(body)
            alg, value = request["alg"], unb64u(request["value"])
        except Exception:
            raise kv_error(400, "BadParameter", "Invalid request body.")
        if hostile == "echo":
            # A server that quotes the request in its error: the KEK (wrapKey) or the blob.
            self.echoed([value])
            if op == "wrapkey":
                raise kv_error(400, "BadParameter", f"Invalid request body: {body.decode()}")
            raise Reply(400, f"Bad request: {body.decode()}".encode())
        now = time.time()
        # Key Vault refuses private-key operations on a disabled key (403, innererror KeyDisabled);
        # a public-key wrap with RSA stays allowed, as the service does. Expiry and not-before
        # bind encrypt and wrap only (the service still decrypts and unwraps with an expired
        # key); the shape of that refusal (403 with innererror KeyExpired) is the emulation's
        # guess.
        private = op == "unwrapkey" or found["kty"] != "RSA"
        if private and not found["enabled"]:
            raise kv_error(403, "Forbidden", f"Operation {op[:-3]}Key is not allowed on a disabled key.", "KeyDisabled")
        if op == "wrapkey" and found.get("exp") and found["exp"] < now:
            raise kv_error(403, "Forbidden", "Operation wrapKey is not allowed on an expired key.", "KeyExpired")
        if found["kty"] == "RSA":
            if alg != "RSA-OAEP-256":
                raise kv_error(400, "BadParameter", f"Algorithm {alg} is not supported for this key.")
            oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
            key = serialization.load_pem_private_key(found["pem"].encode(), None)
            if op == "wrapkey":
                result = key.public_key().encrypt(value, oaep)
            else:
                try:
                    result = key.decrypt(value, oaep)
                except Exception:
                    raise kv_error(400, "BadParameter", "Error occurred while decrypting the data.")
        else:
            if alg != "A256KW":
                raise kv_error(400, "BadParameter", f"Algorithm {alg} is not supported for this key.")
            k = unb64u(found["k"])
            if op == "wrapkey":
                result = aes_key_wrap(k, value)
            else:
                try:
                    result = aes_key_unwrap(k, value)
                except (InvalidUnwrap, ValueError):
                    raise kv_error(400, "BadParameter", "Error occurred while unwrapping the data.")
        if hostile == "short-kek" and op == "unwrapkey":
            result = result[:16]
        raise Reply(200, {"kid": kid, "value": b64u(result)})

    def bundle(self, data, kid, v):
        attributes = {"enabled": v["enabled"], "created": v["created"], "updated": v["updated"],
                      "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90}
        if v.get("exp"):
            attributes["exp"] = v["exp"]
        key = {"kid": kid, "kty": v["kty"], "key_ops": ["wrapKey", "unwrapKey", "encrypt", "decrypt"]}
        if v["kty"] == "RSA":
            numbers = serialization.load_pem_private_key(v["pem"].encode(), None).public_key().public_numbers()
            key["n"] = b64u(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
            key["e"] = b64u(numbers.e.to_bytes(3, "big"))
        return {"key": key, "attributes": attributes}


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that hangs up mid-answer (a timed-out plugin) is expected in the tests.
        if os.environ.get("AZURE_EMULATOR_VERBOSE"):
            super().handle_error(request, client_address)


def serve(d, port):
    server = Server(("127.0.0.1", port), Handler)
    server.dir = d
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(d, "server.pem"), os.path.join(d, "server.key"))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


# --- admin -------------------------------------------------------------------------------------


def admin(d, args):
    with State(d) as s:
        data = s.data
        versions = data["keys"][KEY]
        pick = lambda: next(v for v in versions if v["version"] == args[1]) if len(args) > 1 else versions[-1]
        cmd = args[0]
        if cmd == "rotate":
            print(new_version(data))
        elif cmd == "create":
            print(new_version(data, args[1]))
        elif cmd in ("disable", "enable"):
            v = pick()
            v["enabled"] = cmd == "enable"
            v["updated"] = int(time.time())
        elif cmd == "expire":
            v = pick()
            v["exp"] = int(time.time()) - 1
        elif cmd in ("deny", "allow"):
            data["denied"] = cmd == "deny"
        elif cmd == "hostile":
            data["hostile"] = None if args[1] == "off" else args[1]
        elif cmd == "counters":
            print(json.dumps(data["counters"]))
        elif cmd == "versions":
            print("\n".join(v["version"] for v in versions))
        elif cmd == "unwrap":
            name, version = args[1].rstrip("/").rsplit("/", 2)[1:]
            blob = unb64u(args[2])
            v = next(v for v in data["keys"][name] if v["version"] == version)
            if v["kty"] == "RSA":
                key = serialization.load_pem_private_key(v["pem"].encode(), None)
                oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
                print(b64u(key.decrypt(blob, oaep)))
            else:
                print(b64u(aes_key_unwrap(unb64u(v["k"]), blob)))
        else:
            sys.exit(f"unknown admin command {cmd}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init")
    i.add_argument("--dir", required=True)
    i.add_argument("--hsm", action="store_true", help="a Managed HSM with an oct-HSM key (A256KW)")
    s = sub.add_parser("serve")
    s.add_argument("--dir", required=True)
    s.add_argument("--port", type=int, required=True)
    a = sub.add_parser("admin")
    a.add_argument("--dir", required=True)
    a.add_argument("args", nargs="+")
    ns = p.parse_args()
    if ns.cmd == "init":
        init(ns.dir, ns.hsm)
    elif ns.cmd == "serve":
        serve(ns.dir, ns.port)
    else:
        admin(ns.dir, ns.args)


if __name__ == "__main__":
    main()

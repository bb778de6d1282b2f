"""Status, Encrypt and Decrypt through Python's grpcio (a C-core client) on a Unix socket.

Usage: grpcio_client.py SOCKET. Prints one JSON line: {"status": {...}, "round_trip": true,
"key_id": ...}, or {"error": CODE, "details": ...} and exits 1. No generated code: the KMS v2
messages are a handful of protobuf fields, encoded by hand below.
"""
import json
import os
import sys

import grpc

SERVICE = "/v2.KeyManagementService/"


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, value):
    """A length-delimited field (bytes, string or message)."""
    return varint(number << 3 | 2) + varint(len(value)) + value


def parse(data):
    """The length-delimited fields of a message, as (number, raw bytes), in order."""
    fields, i = [], 0
    while i < len(data):
        key, i = read_varint(data, i)
        number, kind = key >> 3, key & 7
        if kind == 2:
            n, i = read_varint(data, i)
            fields.append((number, data[i : i + n]))
            i += n
        elif kind == 0:
            _, i = read_varint(data, i)
        else:
            raise ValueError(f"unexpected wire type {kind}")
    return fields


def read_varint(data, i):
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def main():
    socket = sys.argv[1]
    channel = grpc.insecure_channel("unix:" + os.path.abspath(socket))
    call = lambda method, body: channel.unary_unary(SERVICE + method)(body, timeout=10)
    try:
        status = {n: v.decode() for n, v in parse(call("Status", b""))}
        plaintext = os.urandom(32)
        uid = b"grpcio-test"
        encrypted = parse(call("Encrypt", field(1, plaintext) + field(2, uid)))
        ciphertext = next(v for n, v in encrypted if n == 1)
        key_id = next(v for n, v in encrypted if n == 2)
        annotations = [v for n, v in encrypted if n == 3]
        request = field(1, ciphertext) + field(2, uid) + field(3, key_id)
        request += b"".join(field(4, entry) for entry in annotations)
        decrypted = parse(call("Decrypt", request))
        round_trip = next((v for n, v in decrypted if n == 1), b"") == plaintext
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "details": e.details()}))
        sys.exit(1)
    print(
        json.dumps(
            {
                "status": {"version": status.get(1), "healthz": status.get(2), "key_id": status.get(3)},
                "round_trip": round_trip,
                "key_id": key_id.decode(),
            }
        )
    )


if __name__ == "__main__":
    main()

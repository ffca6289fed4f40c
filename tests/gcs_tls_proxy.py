"""Lets TensorFlow's own GCS client reach fake-gcs-server: an HTTPS proxy for googleapis.com.

TF's GCS filesystem (tf.io.gfile, tf.summary, tfds's reads) has https://www.googleapis.com and
https://storage.googleapis.com compiled in; no variable changes them. It does use libcurl, which
honours ``HTTPS_PROXY`` and TF's ``CURL_CA_BUNDLE``. So this process

* makes a throw-away CA and a certificate for those two hosts, signed by it (``ca.pem`` is what
  ``CURL_CA_BUNDLE`` points at: nothing else trusts it);
* listens on 127.0.0.1 for ``CONNECT www.googleapis.com:443`` (other hosts get 403), answers
  200, terminates TLS with that certificate, and forwards each request as plain HTTP to the
  emulator, with three header changes: ``Transfer-Encoding: identity`` is dropped (TF sends it
  with every upload; Go's net/http, the emulator's server, refuses it with 501, GCS ignores it),
  ``X-Forwarded-Proto: https`` is added (the emulator builds resumable-upload URLs from it, so TF
  comes back through the proxy), and ``Connection: close`` (one request per connection, so the
  proxy never has to parse a response).

    python tests/gcs_tls_proxy.py EMULATOR_PORT CERT_DIR   # prints "PORT <n>" once it listens
"""

from __future__ import annotations

import datetime
import os
import select
import socket
import ssl
import sys
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOSTS = ("www.googleapis.com", "storage.googleapis.com")
CA_FILE = "ca.pem"
MAX_HEAD_BYTES = 1 << 16


def write_certificates(cert_dir: str) -> ssl.SSLContext:
    """Writes ca.pem, and returns a server context with a certificate for HOSTS signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(
        not_valid_before=now - datetime.timedelta(hours=1),
        not_valid_after=now + datetime.timedelta(days=7),
    )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bt_jax test-only CA")])
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, **valid)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]),
            issuer_name=ca_name,
            **valid,
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    with open(os.path.join(cert_dir, CA_FILE), "wb") as f:
        f.write(ca.public_bytes(pem))
    cert_path, key_path = os.path.join(cert_dir, "cert.pem"), os.path.join(cert_dir, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


def _read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """Reads up to the blank line ending an HTTP head: (head, the bytes read past it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(MAX_HEAD_BYTES)
        if not chunk or len(data) > MAX_HEAD_BYTES:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def _rewrite(head: bytes) -> bytes:
    dropped = (b"transfer-encoding: identity", b"connection:", b"x-forwarded-proto:")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(dropped)]
    return b"\r\n".join(lines + [b"X-Forwarded-Proto: https", b"Connection: close"]) + b"\r\n\r\n"


def _pipe(client: ssl.SSLSocket, upstream: socket.socket) -> None:
    """Copies bytes both ways until one side closes."""
    while True:
        readable, _, _ = select.select([client, upstream], [], [])
        for sock in readable:
            data = sock.recv(1 << 16)
            # Decrypted bytes can wait inside the SSL object, where select does not see them.
            while sock is client and client.pending():
                data += client.recv(client.pending())
            if not data:
                return
            (upstream if sock is client else client).sendall(data)


def _serve_connection(conn: socket.socket, context: ssl.SSLContext, emulator_port: int) -> None:
    try:
        connect = _read_head(conn)
        if connect is None:
            return
        request_line = connect[0].split(b"\r\n", 1)[0].decode("latin-1").split()
        host = request_line[1].rsplit(":", 1)[0] if len(request_line) == 3 else ""
        if request_line[0] != "CONNECT" or host not in HOSTS:
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with context.wrap_socket(conn, server_side=True) as client:
            request = _read_head(client)
            if request is None:
                return
            with socket.create_connection(("127.0.0.1", emulator_port)) as upstream:
                upstream.sendall(_rewrite(request[0]) + request[1])
                _pipe(client, upstream)
    except (OSError, ssl.SSLError):
        pass  # The client went away; it retries or reports the error itself.
    finally:
        conn.close()


def main(emulator_port: int, cert_dir: str) -> None:
    context = write_certificates(cert_dir)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(
            target=_serve_connection, args=(conn, context, emulator_port), daemon=True
        ).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])

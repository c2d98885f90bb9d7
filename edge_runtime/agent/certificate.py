"""A self-signed TLS certificate for a coordinator on this machine (localhost / 127.0.0.1).

The coordinator refuses plaintext off loopback, and even on loopback the demo, the tests and the sync
benchmark run it with TLS, so that what they exercise (handshakes, per-connection TLS state, token
headers on an encrypted channel) is what a real fleet runs. Devices trust exactly this certificate
(it is its own CA). For a real deployment use a certificate from your own CA or a public one.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def make_certificate(directory: Path, days: int = 2) -> tuple[Path, Path]:
    """Write `cert.pem` and `key.pem` (ECDSA P-256, key mode 0600) into `directory`; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path

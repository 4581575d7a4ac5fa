"""Certificates for the network transport: a CA the controller creates, and the
certificates it issues to itself (server) and to each agent (client, CN = agent id).

Mutual TLS is what keeps strangers out: an agent only talks to a server whose
certificate the CA signed (nobody can pose as the controller and issue commands), and
the controller only accepts clients with a CA-signed *agent* certificate, whose common
name must match the agent id in every request (no agent can pose as another).

Keys are ECDSA P-256 (fast to generate, supported by gRPC's TLS).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from targetvirt.errors import InvalidArgument

AGENT_UNIT = "targetvirt agent"
SERVER_UNIT = "targetvirt controller"
_CA_CERT, _CA_KEY = "ca.pem", "ca.key"


@dataclass(frozen=True)
class Credentials:
    """What one end presents (certificate and key) and trusts (the CA), all PEM."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def save(self, directory: str, name: str) -> None:
        """``name.pem``, ``name.key`` (0600) and ``ca.pem`` in ``directory``."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _write(os.path.join(directory, f"{name}.key"), self.key_pem, 0o600)
        _write(os.path.join(directory, f"{name}.pem"), self.cert_pem, 0o644)
        _write(os.path.join(directory, _CA_CERT), self.ca_pem, 0o644)

    @classmethod
    def load(cls, directory: str, name: str) -> Credentials:
        return cls(
            _read(os.path.join(directory, _CA_CERT)),
            _read(os.path.join(directory, f"{name}.pem")),
            _read(os.path.join(directory, f"{name}.key")),
        )


class CertificateAuthority:
    """The controller's CA."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(
        cls, name: str = "targetvirt controller CA", days: int = 3650
    ) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: str) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(_read(os.path.join(directory, _CA_CERT)))
        key = serialization.load_pem_private_key(_read(os.path.join(directory, _CA_KEY)), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument(f"{directory}/{_CA_KEY} is not an EC private key")
        return cls(cert, key)

    def save(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _write(os.path.join(directory, _CA_KEY), _key_pem(self.key), 0o600)
        _write(os.path.join(directory, _CA_CERT), self.ca_pem, 0o644)

    @property
    def ca_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue_server(self, hostnames: Sequence[str], days: int = 825) -> Credentials:
        """The controller's certificate, valid for these host names / IP addresses."""
        names: list[x509.GeneralName] = []
        for host in hostnames:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return self._issue(
            "targetvirt-controller", SERVER_UNIT, ExtendedKeyUsageOID.SERVER_AUTH, names, days
        )

    def issue_agent(self, agent_id: str, days: int = 825) -> Credentials:
        """An agent's client certificate: its common name is the agent id."""
        if not agent_id or len(agent_id) > 64:
            raise InvalidArgument(f"agent id {agent_id!r} must be 1-64 characters")
        return self._issue(agent_id, AGENT_UNIT, ExtendedKeyUsageOID.CLIENT_AUTH, [], days)

    def _issue(
        self,
        common_name: str,
        unit: str,
        usage: x509.ObjectIdentifier,
        names: list[x509.GeneralName],
        days: int,
    ) -> Credentials:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Credentials(
            self.ca_pem, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
        )


def agent_identity(cert_pem: bytes) -> str | None:
    """The agent id a client certificate proves, or None if it is not an agent certificate.

    (Its signature was checked by the TLS handshake against the CA.)
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, x509.ExtensionNotFound):
        return None
    if [u.value for u in units] != [AGENT_UNIT] or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        return None
    value = names[0].value if len(names) == 1 else None
    return value if isinstance(value, str) else None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None

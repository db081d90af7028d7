"""`gateway keys list|generate|import`: the gateway's identities and the correspondents' keys.

- `list` shows each identity (X.509 subject and expiry, or OpenPGP fingerprint and user IDs)
  and each directory entry, with what is expired or revoked.
- `generate` makes a key pair: X.509 (an EC P-256 or RSA key and either a self-signed
  certificate or a CSR for the CA) or OpenPGP (Ed25519/Cv25519 that GnuPG 2.2 can use).
- `import` validates a correspondent's certificate or OpenPGP key and copies it into the first
  `directory:` folder.

Untrusted input: the files being imported.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from adapters.base import Directory, certificate_addresses
from gateway.dn import parse_dn
from gateway.pki import KeyRing

__all__ = ["KeyCommandError", "generate_openpgp", "generate_x509", "import_key", "list_keys"]


class KeyCommandError(Exception):
    """The sentence for the operator."""


def _x509_line(certificate: x509.Certificate, now: dt.datetime) -> str:
    expiry = certificate.not_valid_after_utc
    state = "EXPIRED" if expiry <= now else (
        "expires soon" if expiry - now < dt.timedelta(days=30) else "valid")
    emails = ", ".join(sorted(certificate_addresses(certificate))) or "-"
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex()[:16]
    return (f"X.509  {certificate.subject.rfc4514_string()}  <{emails}>  "
            f"until {expiry:%Y-%m-%d}  {state}  sha256:{fingerprint}")


def _openpgp_lines(data: bytes, now: dt.datetime) -> list[str]:
    from adapters import pgpkeys

    index = pgpkeys.key_index(Directory(openpgp=(data,)))
    lines = []
    for cert in index.certs:
        state = "REVOKED" if cert.revoked else ("EXPIRED" if cert.expired(now) else "valid")
        until = f"until {cert.expiration:%Y-%m-%d}" if cert.expiration else "no expiry"
        lines.append(f"OpenPGP {cert.fingerprint}  {'; '.join(cert.user_ids)}  {until}  {state}")
    lines += [f"OpenPGP unreadable: {p}" for p in index.problems]
    return lines


def list_keys(keyring: KeyRing, now: dt.datetime) -> list[str]:
    lines = ["identities:"]
    for name, identity in sorted(keyring.identities.items()):
        if identity.certificate is not None:
            lines.append(f"  {name}: {_x509_line(identity.certificate, now)}")
        if identity.openpgp_secret is not None:
            for line in _openpgp_lines(identity.openpgp_secret, now):
                lines.append(f"  {name}: {line}")
    lines.append("directory:")
    for certificate in keyring.directory.x509:
        lines.append(f"  {_x509_line(certificate, now)}")
    for entry in keyring.directory.openpgp:
        lines += [f"  {line}" for line in _openpgp_lines(entry, now)]
    return lines


def _write_private(path: Path, data: bytes) -> None:
    if path.exists():
        raise KeyCommandError(f"{path} exists; choose another --out or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def generate_x509(out: Path, subject: str, emails: list[str], dns: list[str], *,
                  csr: bool, rsa_key: bool, days: int, now: dt.datetime) -> list[Path]:
    """A key and a self-signed certificate (`out`.pem) or a CSR (`out`.csr); `out`.key is 0600."""
    try:
        name = x509.Name.from_rfc4514_string(str(parse_dn(subject)))
    except ValueError as error:
        raise KeyCommandError(f"--subject is not a distinguished name: {error}") from None
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    key = rsa.generate_private_key(65537, 3072) if rsa_key else ec.generate_private_key(
        ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.RFC822Name(e) for e in emails]
    names += [x509.DNSName(d) for d in dns]
    usages = [ExtendedKeyUsageOID.EMAIL_PROTECTION] if emails else []
    if dns:
        usages += [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    key_path = out.with_suffix(".key")
    _write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    if csr:
        request_builder = x509.CertificateSigningRequestBuilder().subject_name(name)
        if names:
            request_builder = request_builder.add_extension(
                x509.SubjectAlternativeName(names), critical=False)
        request = request_builder.sign(key, hashes.SHA256())
        csr_path = out.with_suffix(".csr")
        csr_path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
        return [key_path, csr_path]
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    cert_path = out.with_suffix(".pem")
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return [key_path, cert_path]


def generate_openpgp(out: Path, user_id: str, now: dt.datetime) -> list[Path]:
    """An Ed25519/Cv25519 secret key (`out`.asc, 0600) and its public part (`out`.pub.asc)."""
    from adapters import pgpkeys

    if "@" not in user_id:
        raise KeyCommandError('--uid must carry a mail address, as in "Passerelle <gw@x.org>"')
    secret = pgpkeys.generate_identity(user_id, created=now)
    secret_path = out.with_suffix(".asc")
    _write_private(secret_path, secret)
    public = _public_part(secret)
    public_path = out.with_name(out.stem + ".pub.asc")
    public_path.write_bytes(public)
    return [secret_path, public_path]


def _public_part(secret: bytes) -> bytes:
    """The transferable public key of a secret key (what correspondents import)."""
    import warnings

    import pysequoia

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return str(pysequoia.Cert.from_bytes(secret)).encode("ascii")


def import_key(source: Path, directory: Path, now: dt.datetime) -> tuple[Path, list[str]]:
    """Copy a correspondent's certificate or OpenPGP key into `directory` after reading it."""
    try:
        data = source.read_bytes()
    except OSError as error:
        raise KeyCommandError(f"cannot read {source}: {error.strerror}") from None
    if b"-----BEGIN PGP" in data or (data[:1] and data[0] & 0x80):
        lines = _openpgp_lines(data, now)
        if not lines or all("unreadable" in line for line in lines):
            raise KeyCommandError(f"{source} is not an OpenPGP public key")
        if b"PRIVATE KEY BLOCK" in data:
            raise KeyCommandError(f"{source} holds a secret key: import only public keys")
        suffix = ".asc"
    else:
        try:
            certificates = (x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                            else [x509.load_der_x509_certificate(data)])
        except ValueError:
            raise KeyCommandError(f"{source} is neither a certificate nor an OpenPGP key") from None
        lines = [_x509_line(c, now) for c in certificates]
        data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
        suffix = ".pem"
        first = certificates[0]
        if not certificate_addresses(first) and not first.subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        ):
            raise KeyCommandError(f"{source}: the certificate names no one")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / (source.stem + suffix)
    if target.exists():
        raise KeyCommandError(f"{target} exists already; remove it first to replace it")
    target.write_bytes(data)
    return target, lines

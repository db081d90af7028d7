"""Generation of X.509 material: an IGC-Santé-shaped root and intermediate, leaves, CRLs.

Used by `gateway demo` to build its demonstration PKI and by the tests to build theirs; never
by the relay itself. Everything is generated in memory (EC P-256 by default, RSA on request)
and can be written as PEM files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def new_key(kind: str = "ec") -> CertificateIssuerPrivateKeyTypes:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def name(**parts: str) -> x509.Name:
    """x509.Name from keyword parts in the usual order: CN, OU, O, ST, C, emailAddress."""
    oids = {
        "CN": NameOID.COMMON_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "O": NameOID.ORGANIZATION_NAME,
        "ST": NameOID.STATE_OR_PROVINCE_NAME,
        "C": NameOID.COUNTRY_NAME,
        "E": NameOID.EMAIL_ADDRESS,
    }
    # Real certificates (IGC-Santé included) encode C first and CN last; RFC 4514 prints the
    # RDNs in reverse, so the name reads CN=...,OU=...,O=...,ST=...,C=FR as the whitelist does.
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in reversed(parts.items())])


@dataclass
class Issued:
    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    issuer: Issued | None = None
    revoked: list[int] = field(default_factory=list)  # serials this CA revoked
    crl_number: int = 0  # of the last CRL issued

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain_pem(self) -> bytes:
        """This certificate followed by its issuers up to, not including, the root."""
        out = self.cert_pem
        issuer = self.issuer
        while issuer is not None and issuer.issuer is not None:
            out += issuer.cert_pem
            issuer = issuer.issuer
        return out

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path

    # -- issuing ---------------------------------------------------------------------------

    def issue(
        self,
        subject: x509.Name,
        *,
        ca: bool = False,
        key: CertificateIssuerPrivateKeyTypes | None = None,
        key_kind: str = "ec",
        dns: Sequence[str] = (),
        emails: Sequence[str] = (),
        ips: Sequence[str] = (),
        eku: Iterable[x509.ObjectIdentifier] | None = None,
        key_usage: str = "auto",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        serial: int | None = None,
    ) -> Issued:
        key = key or new_key(key_kind)
        not_before = not_before or NOW - dt.timedelta(days=1)
        not_after = not_after or NOW + dt.timedelta(days=365)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if ca:
            builder = builder.add_extension(_key_usage(cert_sign=True), critical=True)
        else:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            names += [x509.RFC822Name(e) for e in emails]
            names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            if names:
                builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            if eku is None:
                eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                if emails:
                    eku = [ExtendedKeyUsageOID.EMAIL_PROTECTION]
            eku = list(eku)
            if eku:
                builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            if key_usage == "auto":
                rsa_key = isinstance(key, rsa.RSAPrivateKey)
                builder = builder.add_extension(
                    _key_usage(signature=True, encipherment=rsa_key, agreement=not rsa_key),
                    critical=True,
                )
            elif key_usage == "signature":
                builder = builder.add_extension(_key_usage(signature=True), critical=True)
            elif key_usage == "encipherment":
                builder = builder.add_extension(_key_usage(encipherment=True), critical=True)
        certificate = builder.sign(self.key, hashes.SHA256())
        return Issued(certificate, key, issuer=self)

    def revoke(self, leaf: Issued) -> None:
        self.revoked.append(leaf.certificate.serial_number)

    def crl(
        self,
        *,
        last_update: dt.datetime | None = None,
        next_update: dt.datetime | None = None,
        signer: Issued | None = None,
        extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> x509.CertificateRevocationList:
        """A CRL of this CA (signed by `signer` instead, to make a badly signed one), with
        `extensions` (value, critical) added, e.g. a delta or partial-scope CRL."""
        last_update = last_update or NOW - dt.timedelta(hours=1)
        next_update = next_update or NOW + dt.timedelta(days=7)
        # RFC 5280 §5.2: a conforming CRL names its signing key and carries an increasing
        # number, as the IGC-Santé CRLs do.
        self.crl_number += 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(last_update)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(self.crl_number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    (signer or self).key.public_key()),
                critical=False,
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(last_update)
                .build()
            )
        return builder.sign((signer or self).key, hashes.SHA256())


def _key_usage(
    *,
    signature: bool = False,
    encipherment: bool = False,
    agreement: bool = False,
    cert_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=encipherment,
        data_encipherment=False,
        key_agreement=agreement,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def root(subject: x509.Name | None = None, key_kind: str = "ec") -> Issued:
    """A self-signed root CA."""
    subject = subject or name(CN="TEST AC RACINE IGC-SANTE", O="ASIP-SANTE", C="FR")
    key = new_key(key_kind)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=30))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


@dataclass
class IgcSante:
    """Root → "ORGANISATIONS" intermediate, as IGC-Santé is shaped."""

    root: Issued
    organisations: Issued

    @staticmethod
    def create(key_kind: str = "ec") -> IgcSante:
        ca = root(key_kind=key_kind)
        inter = ca.issue(
            name(CN="TEST AC IGC-SANTE ELEMENTAIRE ORGANISATIONS", O="ASIP-SANTE", C="FR"),
            ca=True,
            key_kind=key_kind,
        )
        return IgcSante(ca, inter)

    def server(self, fqdn: str, *, structure: str = "1750000000", org: str = "CHU TEST",
               department: str = "Paris (75)", **kwargs: object) -> Issued:
        """A server/client certificate shaped like an IGC-Santé SSL certificate."""
        subject = name(CN=fqdn, OU=structure, O=org, ST=department, C="FR")
        kwargs.setdefault("dns", [fqdn])
        return self.organisations.issue(subject, **kwargs)  # type: ignore[arg-type]

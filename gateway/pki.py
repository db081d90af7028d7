"""The gateway's key material, read from the files routing.yaml names (DESIGN.md §3, §10).

`load_keyring` turns the paths of a `Config` into the objects adapters take (`Identity`,
`TrustStore`, `Directory`); `problems` runs the same reading as `gateway check` does and says,
at the line of routing.yaml that named the file, what is wrong with it:

- a file that does not exist or cannot be read, or does not hold what its key says;
- a private key that does not match its certificate (identities and gateway.tls);
- an identity or TLS certificate that has expired or expires within 30 days (warning);
- a CRL that no configured CA signed, or whose nextUpdate has passed (the gateway refuses to
  rely on it, DESIGN.md §10 "Revocation"), and every CA that has no CRL at all (warning: what
  it issued is not revocation-checked);
- a key file readable by group or other users (warning, DESIGN.md §10);
- a spool encryption key that is not exactly 32 bytes.

Formats: certificates PEM (several per file, leaf first then its chain) or DER; private keys
PEM or DER, PKCS#8 or traditional, unencrypted (the gateway runs unattended: it protects keys
with file permissions, not passphrases); CRLs PEM or DER; OpenPGP keys are kept as the bytes
of the file (armored or binary) and parsed by the adapters, only their first packet is looked
at here to catch a public key given where a secret key belongs. Directory folders are read
one level deep: `*.pem`, `*.crt`, `*.cer` are X.509, `*.asc`, `*.pgp`, `*.gpg` OpenPGP; other
files are ignored.

Untrusted input: every file named by routing.yaml (certificates, keys, CRLs, the directory,
which holds what correspondents sent). Nothing here trusts a certificate because it parsed.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from adapters.base import Directory, Identity, TrustStore
from gateway.config import Config, Problem, Severity
from gateway.dn import DistinguishedName, dn_from_name

__all__ = ["KeyMaterialError", "KeyRing", "inspect", "load_keyring", "problems"]

EXPIRY_WARNING = dt.timedelta(days=30)
SPOOL_KEY_SIZE = 32
X509_SUFFIXES = (".pem", ".crt", ".cer")
OPENPGP_SUFFIXES = (".asc", ".pgp", ".gpg")

_PGP_BLOCK = re.compile(
    rb"-----BEGIN PGP PUBLIC KEY BLOCK-----.*?-----END PGP PUBLIC KEY BLOCK-----[^\n]*\n?",
    re.DOTALL,
)


@dataclass(frozen=True)
class KeyRing:
    """Everything the adapters and the TLS layer need from the key files."""

    identities: Mapping[str, Identity]
    trust: TrustStore
    directory: Directory
    tls_certificate: Path | None = None  # leaf then chain, as ssl.load_cert_chain wants
    tls_key: Path | None = None
    spool_key: bytes | None = None
    # Per identity, when its certificate stops being valid (for `check` and the expiry metric).
    expiry: Mapping[str, dt.datetime] = field(default_factory=dict)


class KeyMaterialError(Exception):
    """A file named by routing.yaml cannot be used; `problems` says which and why."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def load_keyring(config: Config, now: dt.datetime) -> KeyRing:
    """The key material of `config`; KeyMaterialError if any file has an error."""
    keyring, found = inspect(config, now)
    errors = [p for p in found if p.severity == "error"]
    if errors:
        raise KeyMaterialError(errors)
    return keyring


def problems(config: Config, now: dt.datetime) -> list[Problem]:
    """What `gateway check` reports about the files `config` names, in file order."""
    return inspect(config, now)[1]


def inspect(config: Config, now: dt.datetime) -> tuple[KeyRing, list[Problem]]:
    """Read every file once: the key ring (with what could be read) and the problems."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    reader = _Reader(config, now)
    keyring = reader.run()
    return keyring, sorted(reader.found, key=lambda p: p.line)


# -- reading ----------------------------------------------------------------------------------


def _label(dotted: str) -> str:
    """A key path as operators read it: `trust.anchors.1` → `trust.anchors`."""
    return ".".join(part for part in dotted.split(".") if not part.isdigit())


def _utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        # Old roots carry no BasicConstraints; a self-issued certificate is taken as a CA.
        return certificate.issuer == certificate.subject
    return constraints.value.ca


def _public_der(public_key: PublicKeyTypes) -> bytes | None:
    """SubjectPublicKeyInfo DER of a public key, to compare a key pair's halves."""
    try:
        data: bytes = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError):
        return None
    return data


class _Reader:
    def __init__(self, config: Config, now: dt.datetime) -> None:
        self.config = config
        self.now = now
        self.base = config.path.absolute().parent
        self.found: list[Problem] = []
        # CAs some CRL file claims to cover, good or bad: a CA whose CRL is broken gets the
        # CRL's error, not a second "has no CRL" warning.
        self.crl_issuers: set[DistinguishedName] = set()

    # -- reporting --------------------------------------------------------------------------

    def report(self, dotted: str, message: str, severity: Severity = "error") -> None:
        self.found.append(Problem(self.config.path, self.config.line(dotted), message, severity))

    def about(self, dotted: str, path: Path, text: str, severity: Severity = "error") -> None:
        """Report a problem with the file at `path`, named by the key at `dotted`."""
        self.report(dotted, f"{_label(dotted)}: {self.shown(path)} {text}", severity)

    def shown(self, path: Path) -> str:
        """A path as the operator wrote it: relative to routing.yaml's folder when inside it."""
        try:
            return str(path.relative_to(self.base))
        except ValueError:
            return str(path)

    # -- files ------------------------------------------------------------------------------

    def read(self, path: Path, dotted: str) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            self.about(dotted, path, "does not exist; fix the path "
                       "(relative paths start from the folder of routing.yaml)")
        except IsADirectoryError:
            self.about(dotted, path, "is a folder; name a file")
        except OSError as error:
            self.about(dotted, path, f"cannot be read "
                       f"({error.strerror or error}); give the gateway's user read access")
        return None

    def check_private_mode(self, path: Path, dotted: str) -> None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            return  # already reported by read()
        if mode & 0o077:
            self.about(dotted, path, f"is accessible to group or other "
                       f"users (mode {mode:04o}); run chmod 600 {self.shown(path)}", "warning")

    def certificates(self, path: Path, dotted: str) -> list[x509.Certificate]:
        data = self.read(path, dotted)
        if data is None:
            return []
        try:
            if b"-----BEGIN" in data:
                return x509.load_pem_x509_certificates(data)
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            self.about(dotted, path, "does not hold an X.509 "
                       "certificate (PEM or DER)")
            return []

    def private_key(self, path: Path, dotted: str) -> PrivateKeyTypes | None:
        data = self.read(path, dotted)
        if data is None:
            return None
        self.check_private_mode(path, dotted)
        try:
            if b"-----BEGIN" in data:
                return serialization.load_pem_private_key(data, password=None)
            return serialization.load_der_private_key(data, password=None)
        except TypeError:
            self.about(dotted, path, "is protected by a passphrase; "
                       "store it unencrypted with mode 600 (openssl pkey -in KEY -out NEW)")
        except (ValueError, UnsupportedAlgorithm):
            self.about(dotted, path, "does not hold a private key "
                       "(PEM or DER, PKCS#8 or traditional)")
        return None

    def expiry(self, certificate: x509.Certificate, dotted: str, label: str) -> None:
        not_after = certificate.not_valid_after_utc
        not_before = certificate.not_valid_before_utc
        if not_after <= self.now:
            self.report(dotted, f"{label}: the certificate expired on {_utc(not_after)}; "
                        "install a renewed one", "warning")
        elif not_after - self.now <= EXPIRY_WARNING:
            days = (not_after - self.now).days
            self.report(dotted, f"{label}: the certificate expires on {_utc(not_after)} "
                        f"(in {days} day(s)); renew it now", "warning")
        if not_before > self.now:
            self.report(dotted, f"{label}: the certificate is not valid before "
                        f"{_utc(not_before)}; check the clock or the certificate", "warning")

    def matching(self, certificate: x509.Certificate, key: PrivateKeyTypes, dotted: str,
                 label: str, key_path: Path) -> None:
        certificate_key = _public_der(certificate.public_key())
        if certificate_key is None or certificate_key != _public_der(key.public_key()):
            self.report(dotted, f"{label}: the key {self.shown(key_path)} does not match the "
                        "certificate; give the key the certificate was issued for")

    # -- sections ---------------------------------------------------------------------------

    def run(self) -> KeyRing:
        config = self.config
        identities: dict[str, Identity] = {}
        expiry: dict[str, dt.datetime] = {}
        for name, settings in config.keys.items():
            identity = self.identity(name, settings.certificate, settings.key,
                                     settings.secret_key)
            identities[name] = identity
            if identity.certificate is not None:
                expiry[name] = identity.certificate.not_valid_after_utc
        tls_certificate, tls_key = self.gateway_tls()
        spool_key = self.spool_key()
        anchors = self.anchors()
        x509_entries, openpgp_entries, directory_cas = self.directory()
        intermediates = [c for i in identities.values() for c in i.chain] + [
            c for c, _ in directory_cas
        ]
        crls = self.crls(anchors, intermediates)
        self.unrevoked_cas(anchors, directory_cas, crls)
        return KeyRing(
            identities=identities,
            trust=TrustStore(tuple(c for c, _ in anchors), tuple(crls)),
            directory=Directory(tuple(x509_entries), tuple(openpgp_entries)),
            tls_certificate=tls_certificate,
            tls_key=tls_key,
            spool_key=spool_key,
            expiry=expiry,
        )

    def identity(self, name: str, certificate_path: Path | None, key_path: Path | None,
                 secret_path: Path | None) -> Identity:
        dotted = f"keys.{name}"
        certificate = None
        chain: tuple[x509.Certificate, ...] = ()
        private_key = None
        if certificate_path is not None:
            found = self.certificates(certificate_path, f"{dotted}.certificate")
            if found:
                certificate, chain = found[0], tuple(found[1:])
                self.expiry(certificate, f"{dotted}.certificate", f"identity {name!r}")
        if key_path is not None:
            private_key = self.private_key(key_path, f"{dotted}.key")
        if certificate is not None and private_key is not None and key_path is not None:
            self.matching(certificate, private_key, f"{dotted}.key", f"identity {name!r}",
                          key_path)
        secret = None
        if secret_path is not None:
            secret = self.openpgp_secret(secret_path, f"{dotted}.secret_key")
        return Identity(name, certificate, private_key, chain, secret)

    def openpgp_secret(self, path: Path, dotted: str) -> bytes | None:
        data = self.read(path, dotted)
        if data is None:
            return None
        self.check_private_mode(path, dotted)
        kind = _openpgp_kind(data)
        if kind == "secret":
            return data
        if kind == "public":
            self.about(dotted, path, "holds a public key; export the "
                       "secret key (gpg --export-secret-keys --armor KEYID)")
        else:
            self.about(dotted, path, "is not an OpenPGP secret key "
                       "(armored or binary)")
        return None

    def gateway_tls(self) -> tuple[Path | None, Path | None]:
        tls = self.config.gateway.tls
        if tls is None:
            return None, None
        found = self.certificates(tls.certificate, "gateway.tls.certificate")
        key = self.private_key(tls.key, "gateway.tls.key")
        if found:
            self.expiry(found[0], "gateway.tls.certificate", "gateway.tls")
            if key is not None:
                self.matching(found[0], key, "gateway.tls.key", "gateway.tls", tls.key)
        return tls.certificate, tls.key

    def spool_key(self) -> bytes | None:
        path = self.config.gateway.spool.encryption_key
        if path is None:
            return None
        dotted = "gateway.spool.encryption_key"
        data = self.read(path, dotted)
        if data is None:
            return None
        self.check_private_mode(path, dotted)
        if len(data) != SPOOL_KEY_SIZE:
            self.about(dotted, path, f"holds {len(data)} bytes, not "
                       f"exactly {SPOOL_KEY_SIZE}; create it with: head -c 32 /dev/urandom > "
                       f"{self.shown(path)}")
            return None
        return data

    def anchors(self) -> list[tuple[x509.Certificate, str]]:
        """Anchor certificates, each with the key path of the entry that named it."""
        anchors: list[tuple[x509.Certificate, str]] = []
        for index, path in enumerate(self.config.trust.anchors):
            dotted = f"trust.anchors.{index}"
            for certificate in self.certificates(path, dotted):
                label = f"trust anchor {dn_from_name(certificate.subject)}"
                if certificate.not_valid_after_utc <= self.now:
                    self.report(dotted, f"{label} ({self.shown(path)}) expired on "
                                f"{_utc(certificate.not_valid_after_utc)}; nothing chaining "
                                "to it will be accepted", "warning")
                if not _is_ca(certificate):
                    self.report(dotted, f"{label} ({self.shown(path)}) is not a CA "
                                "certificate; anchors are the CAs that issue peer and signer "
                                "certificates", "warning")
                anchors.append((certificate, dotted))
        return anchors

    def directory(
        self,
    ) -> tuple[list[x509.Certificate], list[bytes], list[tuple[x509.Certificate, str]]]:
        x509_entries: list[x509.Certificate] = []
        openpgp_entries: list[bytes] = []
        cas: list[tuple[x509.Certificate, str]] = []
        for index, path in enumerate(self.config.directory):
            dotted = f"directory.{index}"
            if path.is_dir():
                try:
                    files = sorted(p for p in path.iterdir() if p.is_file())
                except OSError as error:
                    self.report(dotted, f"directory: {self.shown(path)} cannot be listed "
                                f"({error.strerror or error})")
                    continue
            elif path.exists():
                files = [path]
            else:
                self.report(dotted, f"directory: {self.shown(path)} does not exist; create the "
                            "folder or fix the path")
                continue
            for file in files:
                suffix = file.suffix.lower()
                if suffix in X509_SUFFIXES:
                    for certificate in self.certificates(file, dotted):
                        x509_entries.append(certificate)
                        if _is_ca(certificate):
                            cas.append((certificate, dotted))
                elif suffix in OPENPGP_SUFFIXES:
                    openpgp_entries.extend(self.openpgp_public(file, dotted))
        return x509_entries, openpgp_entries, cas

    def openpgp_public(self, path: Path, dotted: str) -> list[bytes]:
        data = self.read(path, dotted)
        if data is None:
            return []
        kind = _openpgp_kind(data)
        if kind == "secret":
            self.report(dotted, f"directory: {self.shown(path)} holds a secret key; the "
                        "directory is for correspondents' public keys, remove it", "warning")
            return []
        if kind != "public":
            self.report(dotted, f"directory: {self.shown(path)} is not an OpenPGP public key")
            return []
        blocks = _PGP_BLOCK.findall(data)
        # An armored file may hold several keys one after the other: one entry per key.
        return list(blocks) if len(blocks) > 1 else [data]

    def crls(self, anchors: list[tuple[x509.Certificate, str]],
             intermediates: list[x509.Certificate]) -> list[x509.CertificateRevocationList]:
        issuers = [c for c, _ in anchors] + intermediates
        loaded: list[x509.CertificateRevocationList] = []
        for index, path in enumerate(self.config.trust.crls):
            dotted = f"trust.crls.{index}"
            data = self.read(path, dotted)
            if data is None:
                continue
            try:
                if b"-----BEGIN" in data:
                    crl = x509.load_pem_x509_crl(data)
                else:
                    crl = x509.load_der_x509_crl(data)
            except ValueError:
                self.report(dotted, f"trust.crls: {self.shown(path)} is not a CRL (PEM or DER)")
                continue
            issuer = dn_from_name(crl.issuer)
            self.crl_issuers.add(issuer)
            named = [c for c in issuers if dn_from_name(c.subject) == issuer]
            shown = self.shown(path)
            if not named:
                self.report(dotted, f"trust.crls: {shown} is issued by {issuer}, which is not "
                            "among the trust anchors or intermediates; add that CA to "
                            "trust.anchors or remove the CRL")
                continue
            if not any(_signed_by(crl, c) for c in named):
                self.report(dotted, f"trust.crls: the signature of {shown} does not verify "
                            f"with the certificate of {issuer}; download the CRL again from "
                            "the CA")
                continue
            next_update = crl.next_update_utc
            if next_update is None:
                self.report(dotted, f"trust.crls: {shown} has no nextUpdate, so the gateway "
                            "cannot tell when it goes stale", "warning")
            elif next_update <= self.now:
                self.report(dotted, f"trust.crls: {shown} is stale (its nextUpdate was "
                            f"{_utc(next_update)}); download a fresh CRL from the CA: the "
                            "gateway refuses to rely on a stale one")
            if crl.last_update_utc > self.now:
                self.report(dotted, f"trust.crls: {shown} was issued in the future "
                            f"({_utc(crl.last_update_utc)}); check the clock", "warning")
            loaded.append(crl)
        return loaded

    def unrevoked_cas(self, anchors: list[tuple[x509.Certificate, str]],
                      directory_cas: list[tuple[x509.Certificate, str]],
                      crls: list[x509.CertificateRevocationList]) -> None:
        covered = self.crl_issuers | {dn_from_name(crl.issuer) for crl in crls}
        seen = set()
        for certificate, dotted in [*anchors, *directory_cas]:
            subject = dn_from_name(certificate.subject)
            if subject in seen or not _is_ca(certificate):
                continue
            seen.add(subject)
            if subject not in covered:
                self.report(dotted, f"CA {subject} has no CRL under trust.crls, so the "
                            "certificates it issued are not revocation-checked; add its CRL",
                            "warning")


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, (rsa.RSAPublicKey, dsa.DSAPublicKey, ec.EllipticCurvePublicKey,
                            ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return False
    try:
        return crl.is_signature_valid(key)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


def _openpgp_kind(data: bytes) -> str:
    """"secret", "public" or "unknown", from the armor header or the first packet's tag
    (RFC 9580 §4.2: tag 5 secret key, tag 6 public key)."""
    head = data.lstrip()
    if head.startswith(b"-----BEGIN PGP PRIVATE KEY BLOCK-----"):
        return "secret"
    if head.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----"):
        return "public"
    if not data or not data[0] & 0x80:
        return "unknown"
    tag = data[0] & 0x3F if data[0] & 0x40 else (data[0] >> 2) & 0x0F
    return {5: "secret", 6: "public"}.get(tag, "unknown")

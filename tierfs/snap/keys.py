"""Site and domain signing keys, site certificates, and the recovery bundle.

A manifest published upstream must prove that it came from a site of the dedup domain, not
only that it matches itself, so that a restore on a new machine trusts nothing but what the
operator kept off-site. Two Ed25519 keys do that:

- the **domain signing key** (`DATA_DIR/keys/domain.key`): random, made by the `mkfs` that
  creates the domain and copied to every site that joins it. It is separate from the domain
  file's id key (which names content and can never change) and from its secret (the root of
  the symmetric keys to come), so it can be replaced without touching either;
- the **site key** (`DATA_DIR/keys/site.key`): one per site, signs the site's manifests;
- the **site certificate** (`DATA_DIR/keys/site.cert`): the domain key's signature over the
  site's name, UUID, public key, epoch and validity. It travels inside every signed manifest,
  so a verifier needs only the domain's public key.

Everything that is signed is encoded canonically (`canonical_json`) and wrapped in a small
binary envelope (`pack_envelope`), and every signature covers a purpose prefix
(`signing_input`), so a signature made for one kind of object never verifies as another.

The **recovery bundle** puts the domain file, the domain key, the site key and the site
certificate in one file, optionally encrypted with a passphrase (scrypt + AES-256-GCM).

Byte and field layouts: docs/FORMAT.md, "Keys and certificates" and "Recovery bundle".
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import json
import math
import os
import secrets
import struct
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tierfs import config
from tierfs.data import domain as domain_mod
from tierfs.errors import ExitCode, TierfsError

KEYS_DIR = "keys"
SITE_KEY_FILE = "site.key"
SITE_CERT_FILE = "site.cert"
DOMAIN_KEY_FILE = "domain.key"

ALGORITHM = "ed25519"
SITE_KEY_MAGIC = "tierfs-site-key"
DOMAIN_KEY_MAGIC = "tierfs-domain-key"
KEY_FORMAT_VERSION = 1
CERT_MAGIC = b"TFSC"
CERT_BODY_MAGIC = "tierfs-site-certificate"
CERT_FORMAT_VERSION = 1
CERT_PURPOSE = "site-certificate/v1"
CERT_FIELDS = frozenset(
    {
        "magic",
        "format_version",
        "domain_id",
        "domain_public_key",
        "site_name",
        "site_uuid",
        "site_public_key",
        "epoch",
        "issued",
        "valid_until",
    }
)
BUNDLE_MAGIC = "tierfs-key-bundle"
BUNDLE_FORMAT_VERSION = 1
FIRST_EPOCH = 1

SIGNATURE_SIZE = 64
KEY_SIZE = 32
MAX_SECTION = 16 << 20  # no envelope section is anywhere near this; a bigger one is corrupt

# scrypt cost of new bundles (128 MiB, about 0.4 s) and the bounds accepted on import, so that
# a crafted bundle cannot make `import` allocate without limit.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1
SCRYPT_MAX_N, SCRYPT_MAX_R, SCRYPT_MAX_P = 1 << 20, 32, 16
SALT_SIZE, NONCE_SIZE = 16, 12

Passphrase = str | Callable[[], str] | None


class VerificationError(TierfsError):
    """A signature, certificate, domain or encrypted bundle does not verify: trust nothing."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.VERIFY_FAILED)


# --- canonical encodings -------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """The one byte string of a JSON value: sorted keys, no whitespace, ASCII escapes.

    Signatures are over bytes, so a value must have exactly one encoding: keys are sorted by
    code point, `\\uXXXX` escapes replace every non-ASCII character, floats must be finite
    (and are written as Python's shortest round-trip repr), and only JSON types are accepted.
    """
    _check_json(value, "$")
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def _check_json(value: Any, path: str) -> None:
    """Refuse what `json.dumps` would silently convert (int keys, tuples of bytes, NaN)."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value} is not a finite number")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: key {key!r} is not a string")
            _check_json(item, f"{path}.{key}")
        return
    raise TypeError(f"{path}: {type(value).__name__} is not a JSON value")


def parse_canonical(data: bytes, what: str) -> dict[str, Any]:
    """Decode a canonical JSON object, refusing any other encoding of it.

    Re-encoding must give the same bytes, so duplicate keys, spacing, other escapes or
    number forms are refused: a signed object has exactly one valid byte string.
    """
    try:
        value = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VerificationError(f"{what}: not canonical JSON ({exc})") from None
    if not isinstance(value, dict):
        raise VerificationError(f"{what}: not a JSON object")
    try:
        same = canonical_json(value) == data
    except (TypeError, ValueError):
        same = False
    if not same:
        raise VerificationError(f"{what}: not in canonical form")
    return value


def pack_envelope(magic: bytes, version: int, sections: Sequence[bytes]) -> bytes:
    """magic (4) | version (1) | 3 zero bytes | per section: u32 big-endian length, bytes."""
    parts = [magic, bytes([version, 0, 0, 0])]
    for section in sections:
        parts += [struct.pack(">I", len(section)), section]
    return b"".join(parts)


def unpack_envelope(data: bytes, magic: bytes, version: int, count: int, what: str) -> list[bytes]:
    """The `count` sections of an envelope; anything malformed or left over is refused."""
    if len(data) < 8 or data[:4] != magic:
        raise VerificationError(f"{what}: bad magic (not a {magic.decode()} object)")
    if data[4] != version:
        raise TierfsError(
            f"{what}: format version {data[4]} is not supported (this tierfs reads {version})",
            ExitCode.VERSION,
        )
    if data[5:8] != b"\0\0\0":
        raise VerificationError(f"{what}: reserved header bytes are not zero")
    pos, sections = 8, []
    for _ in range(count):
        if pos + 4 > len(data):
            raise VerificationError(f"{what}: truncated")
        (size,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if size > MAX_SECTION or pos + size > len(data):
            raise VerificationError(f"{what}: truncated or oversized section")
        sections.append(bytes(data[pos : pos + size]))
        pos += size
    if pos != len(data):
        raise VerificationError(f"{what}: {len(data) - pos} unexpected trailing bytes")
    return sections


def signing_input(purpose: str, message: bytes) -> bytes:
    """b"tierfs/" + purpose + NUL + message: what a signature actually covers.

    The purpose prefix keeps a signature made for one kind of object (a manifest, a
    certificate) from ever verifying as another.
    """
    if not purpose or "\0" in purpose:
        raise ValueError(f"bad signing purpose {purpose!r}")
    return b"tierfs/" + purpose.encode("ascii") + b"\0" + message


def verify_signature(public_key: bytes, signature: bytes, message: bytes, purpose: str) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature of `message` for `purpose`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        key.verify(signature, signing_input(purpose, message))
    except (InvalidSignature, ValueError):
        return False
    return True


def fingerprint(public_key: bytes) -> str:
    """`SHA256:` + unpadded base64 of SHA-256 of the raw 32-byte public key (what `show` prints)."""
    digest = hashlib.sha256(public_key).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _sign(key: Ed25519PrivateKey, message: bytes, purpose: str) -> bytes:
    return key.sign(signing_input(purpose, message))


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def time_ns_of(text: str, where: str) -> int:
    """Nanoseconds since the Unix epoch of an ISO 8601 time with an offset."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise VerificationError(f"{where}: {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise VerificationError(f"{where}: {text!r} has no UTC offset")
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (when - epoch) // datetime.timedelta(microseconds=1) * 1000


def _canonical_uuid(text: Any, where: str) -> str:
    try:
        return str(uuid.UUID(str(text)))
    except ValueError:
        raise TierfsError(f"{where}: {text!r} is not a UUID", ExitCode.CONFIG) from None


def _check_site_name(name: str, where: str) -> None:
    if not name or "/" in name or "\0" in name:
        raise TierfsError(f"{where}: site name must be a non-empty name", ExitCode.CONFIG)


# --- domain signing key --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DomainKeys:
    """The domain signing key: certifies the sites of one dedup domain."""

    domain_id: str
    created: str
    private_key: Ed25519PrivateKey = dataclasses.field(repr=False)

    @property
    def public_key(self) -> bytes:
        return _raw_public(self.private_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def certify(
        self,
        site_name: str,
        site_uuid: str,
        site_public_key: bytes,
        epoch: int = FIRST_EPOCH,
        valid_until: str | None = None,
    ) -> Certificate:
        """Issue a site certificate: binds the site's identity and epoch to its public key."""
        _check_site_name(site_name, "certificate")
        if epoch < FIRST_EPOCH:
            raise ValueError(f"epoch {epoch} < {FIRST_EPOCH}")
        if len(site_public_key) != KEY_SIZE:
            raise ValueError(f"a site public key is {KEY_SIZE} bytes, not {len(site_public_key)}")
        if valid_until is not None:
            time_ns_of(valid_until, "certificate valid_until")
        unsigned = Certificate(
            domain_id=self.domain_id,
            domain_public_key=self.public_key,
            site_name=site_name,
            site_uuid=_canonical_uuid(site_uuid, "certificate"),
            site_public_key=site_public_key,
            epoch=epoch,
            issued=_utc_now(),
            valid_until=valid_until,
        )
        signature = _sign(self.private_key, unsigned.body(), CERT_PURPOSE)
        return dataclasses.replace(unsigned, signature=signature)

    def to_json(self) -> dict[str, Any]:
        return {
            "magic": DOMAIN_KEY_MAGIC,
            "format_version": KEY_FORMAT_VERSION,
            "domain_id": self.domain_id,
            "algorithm": ALGORITHM,
            "created": self.created,
            "private_key": _raw_private(self.private_key).hex(),
            "public_key": self.public_key.hex(),
        }

    @classmethod
    def from_json(cls, raw: Any, where: str) -> DomainKeys:
        key, created = _parse_key_doc(raw, DOMAIN_KEY_MAGIC, where)
        return cls(_canonical_uuid(raw.get("domain_id"), where), created, key)


def generate_domain_keys(domain_id: str) -> DomainKeys:
    """A new random domain signing key (never derived from the id key, which cannot change)."""
    return DomainKeys(
        _canonical_uuid(domain_id, "domain"), _utc_now(), Ed25519PrivateKey.generate()
    )


def _parse_key_doc(raw: Any, magic: str, where: str) -> tuple[Ed25519PrivateKey, str]:
    """Validate a key file's common fields; the stored public key must match the private one."""
    if not isinstance(raw, dict) or raw.get("magic") != magic:
        raise TierfsError(f"{where}: not a tierfs {magic[7:]} file", ExitCode.CONFIG)
    if raw.get("format_version") != KEY_FORMAT_VERSION:
        raise TierfsError(
            f"{where}: key format {raw.get('format_version')} is not supported (this tierfs "
            f"reads {KEY_FORMAT_VERSION})",
            ExitCode.VERSION,
        )
    if raw.get("algorithm") != ALGORITHM:
        raise TierfsError(
            f"{where}: unknown key algorithm {raw.get('algorithm')!r}", ExitCode.CONFIG
        )
    try:
        private = bytes.fromhex(raw["private_key"])
        public = bytes.fromhex(raw["public_key"])
        created = str(raw["created"])
        if len(private) != KEY_SIZE:
            raise ValueError("private_key is not 32 bytes")
        key = Ed25519PrivateKey.from_private_bytes(private)
    except (KeyError, TypeError, ValueError) as exc:
        raise TierfsError(f"{where}: malformed key file ({exc})", ExitCode.CONFIG) from None
    if _raw_public(key) != public:
        raise TierfsError(f"{where}: public_key does not match private_key", ExitCode.CONFIG)
    return key, created


# --- site certificate ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certificate:
    """The domain key's signature over a site's identity, epoch and public key."""

    domain_id: str
    domain_public_key: bytes
    site_name: str
    site_uuid: str
    site_public_key: bytes
    epoch: int
    issued: str
    valid_until: str | None
    signature: bytes = b""

    def body_json(self) -> dict[str, Any]:
        return {
            "magic": CERT_BODY_MAGIC,
            "format_version": CERT_FORMAT_VERSION,
            "domain_id": self.domain_id,
            "domain_public_key": self.domain_public_key.hex(),
            "site_name": self.site_name,
            "site_uuid": self.site_uuid,
            "site_public_key": self.site_public_key.hex(),
            "epoch": self.epoch,
            "issued": self.issued,
            "valid_until": self.valid_until,
        }

    def body(self) -> bytes:
        """The signed bytes: the canonical JSON of the fields."""
        return canonical_json(self.body_json())

    def encode(self) -> bytes:
        """`TFSC` envelope: the body, then the 64-byte signature."""
        return pack_envelope(CERT_MAGIC, CERT_FORMAT_VERSION, [self.body(), self.signature])

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the certified site key."""
        return fingerprint(self.site_public_key)

    def valid_at(self, time_ns: int) -> bool:
        """Within the validity: at or before `valid_until` (no lower bound, see FORMAT.md)."""
        if self.valid_until is None:
            return True
        return time_ns <= time_ns_of(self.valid_until, "certificate valid_until")

    @classmethod
    def decode(cls, data: bytes, what: str = "site certificate") -> Certificate:
        """Parse (not verify) an encoded certificate; `verify_certificate` checks it."""
        body, signature = unpack_envelope(data, CERT_MAGIC, CERT_FORMAT_VERSION, 2, what)
        raw = parse_canonical(body, what)
        if raw.get("magic") != CERT_BODY_MAGIC:
            raise VerificationError(f"{what}: not a site certificate")
        if raw.get("format_version") != CERT_FORMAT_VERSION:
            raise TierfsError(
                f"{what}: certificate format {raw.get('format_version')} is not supported",
                ExitCode.VERSION,
            )
        if len(signature) != SIGNATURE_SIZE:
            raise VerificationError(f"{what}: signature is not {SIGNATURE_SIZE} bytes")
        cert = _certificate_from_json(raw, signature, what)
        if cert.body() != body:
            raise VerificationError(f"{what}: not in canonical form")
        return cert


def _certificate_from_json(raw: dict[str, Any], signature: bytes, what: str) -> Certificate:
    """Typed fields of a certificate body; anything missing or mistyped is a broken object."""
    if set(raw) != CERT_FIELDS:
        raise VerificationError(f"{what}: unexpected fields {sorted(set(raw) ^ CERT_FIELDS)}")
    try:
        epoch = raw["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < FIRST_EPOCH:
            raise ValueError(f"bad epoch {epoch!r}")
        strings = ("domain_id", "site_name", "site_uuid", "issued")
        if not all(isinstance(raw[k], str) for k in strings):
            raise ValueError("a text field is not a string")
        valid_until = raw["valid_until"]
        if valid_until is not None and not isinstance(valid_until, str):
            raise ValueError("valid_until is not a string")
        cert = Certificate(
            domain_id=raw["domain_id"],
            domain_public_key=bytes.fromhex(raw["domain_public_key"]),
            site_name=raw["site_name"],
            site_uuid=raw["site_uuid"],
            site_public_key=bytes.fromhex(raw["site_public_key"]),
            epoch=epoch,
            issued=raw["issued"],
            valid_until=valid_until,
            signature=signature,
        )
    except (TypeError, ValueError) as exc:
        raise VerificationError(f"{what}: malformed ({exc})") from None
    if len(cert.domain_public_key) != KEY_SIZE or len(cert.site_public_key) != KEY_SIZE:
        raise VerificationError(f"{what}: public keys must be {KEY_SIZE} bytes")
    return cert


def verify_certificate(
    cert: Certificate | bytes,
    domain_public_key: bytes,
    *,
    domain_id: str | None = None,
    what: str = "site certificate",
) -> Certificate:
    """Check that the domain key `domain_public_key` issued `cert`; return it.

    Raises `VerificationError` (exit code 12) naming what does not match: another domain's
    key, a signature that does not verify, or (with `domain_id`) another domain.
    """
    if isinstance(cert, bytes):
        cert = Certificate.decode(cert, what)
    if cert.domain_public_key != domain_public_key:
        raise VerificationError(
            f"{what}: issued by domain key {fingerprint(cert.domain_public_key)}, not by this "
            f"domain's key {fingerprint(domain_public_key)}"
        )
    if not verify_signature(domain_public_key, cert.signature, cert.body(), CERT_PURPOSE):
        raise VerificationError(f"{what}: the domain key's signature does not verify")
    if domain_id is not None and cert.domain_id != domain_id:
        raise VerificationError(
            f"{what}: belongs to domain {cert.domain_id}, not to domain {domain_id}"
        )
    return cert


# --- site key ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SiteKeys:
    """A site's signing key and the certificate the domain issued for it."""

    site_name: str
    site_uuid: str
    created: str
    private_key: Ed25519PrivateKey = dataclasses.field(repr=False)
    certificate: Certificate

    @property
    def public_key(self) -> bytes:
        return _raw_public(self.private_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    @property
    def epoch(self) -> int:
        return self.certificate.epoch

    @property
    def domain_id(self) -> str:
        return self.certificate.domain_id

    def sign(self, message: bytes, purpose: str = "message") -> bytes:
        """Ed25519 signature of `signing_input(purpose, message)`; `verify_signature` checks it."""
        return _sign(self.private_key, message, purpose)

    def to_json(self) -> dict[str, Any]:
        """The `site.key` document (the certificate is a file of its own)."""
        return {
            "magic": SITE_KEY_MAGIC,
            "format_version": KEY_FORMAT_VERSION,
            "site_name": self.site_name,
            "site_uuid": self.site_uuid,
            "algorithm": ALGORITHM,
            "created": self.created,
            "private_key": _raw_private(self.private_key).hex(),
            "public_key": self.public_key.hex(),
        }

    @classmethod
    def from_json(cls, raw: Any, certificate: Certificate, where: str) -> SiteKeys:
        """A site key document with its certificate; the two must name the same site and key."""
        key, created = _parse_key_doc(raw, SITE_KEY_MAGIC, where)
        site = cls(
            site_name=str(raw.get("site_name", "")),
            site_uuid=_canonical_uuid(raw.get("site_uuid"), where),
            created=created,
            private_key=key,
            certificate=certificate,
        )
        _check_site_name(site.site_name, where)
        cert = certificate
        if (cert.site_public_key, cert.site_uuid, cert.site_name) != (
            site.public_key,
            site.site_uuid,
            site.site_name,
        ):
            raise TierfsError(
                f"{where}: the site certificate is for site {cert.site_name!r} {cert.site_uuid} "
                f"key {cert.fingerprint}, not for this key ({site.site_name!r} "
                f"{site.site_uuid} {site.fingerprint})",
                ExitCode.CONFIG,
            )
        return site


# --- files in DATA_DIR/keys ----------------------------------------------------------------


def keys_dir(data_dir: Path) -> Path:
    return data_dir / KEYS_DIR


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int, *, replace: bool = True) -> None:
    """Write `path` atomically (temp file, fsync, rename or link, directory fsync).

    The mode is set with fchmod before any byte is written, so a private key is never
    readable by others, whatever the umask. With `replace=False` the file is linked into
    place, which fails instead of overwriting a file that appeared meanwhile.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            tmp.replace(path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise TierfsError(
            f"{path}: already exists (use --force to replace it)", ExitCode.ALREADY_EXISTS
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _json_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def make_dirs_durable(path: Path, mode: int = 0o755) -> None:
    """`mkdir -p` whose new entries survive a power cut: each new directory's parent is
    fsynced, so a key written inside cannot vanish with the directory that holds it."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=mode, exist_ok=True)
        _fsync_dir(directory.parent)


def _ensure_keys_dir(data_dir: Path) -> Path:
    directory = keys_dir(data_dir)
    make_dirs_durable(directory, 0o700)
    os.chmod(directory, 0o700)
    return directory


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TierfsError(
            f"{path}: {what} missing (restore it with 'tierfs key import BUNDLE DATA_DIR')",
            ExitCode.CONFIG,
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TierfsError(f"{path}: {what} is not JSON ({exc})", ExitCode.CONFIG) from None


def write_domain_keys(data_dir: Path, keys: DomainKeys) -> None:
    write_file(_ensure_keys_dir(data_dir) / DOMAIN_KEY_FILE, _json_bytes(keys.to_json()), 0o600)


def create_domain_keys(data_dir: Path, domain_id: str) -> DomainKeys:
    """Make and store the signing key of a new domain (mkfs without --domain)."""
    keys = generate_domain_keys(domain_id)
    write_domain_keys(data_dir, keys)
    return keys


def load_domain_key_file(path: Path) -> DomainKeys:
    return DomainKeys.from_json(_read_json(path, "domain signing key"), str(path))


def load_domain_keys(data_dir: Path) -> DomainKeys:
    return load_domain_key_file(keys_dir(data_dir) / DOMAIN_KEY_FILE)


def has_domain_keys(data_dir: Path) -> bool:
    return (keys_dir(data_dir) / DOMAIN_KEY_FILE).exists()


def write_site_keys(data_dir: Path, site: SiteKeys) -> None:
    """Store the key first, then its certificate: a crash between leaves a mismatch that
    `load_site_keys` reports, never a certificate for a key that was not kept."""
    directory = _ensure_keys_dir(data_dir)
    write_file(directory / SITE_KEY_FILE, _json_bytes(site.to_json()), 0o600)
    write_file(directory / SITE_CERT_FILE, site.certificate.encode(), 0o644)


def create_site_keys(
    data_dir: Path,
    site_name: str,
    site_uuid: str,
    domain_keys: DomainKeys | None = None,
    *,
    epoch: int = FIRST_EPOCH,
) -> SiteKeys:
    """Make and store a new site key and its certificate (mkfs).

    `domain_keys` issues the certificate; without it, `DATA_DIR/keys/domain.key` does.
    """
    domain_keys = domain_keys or load_domain_keys(data_dir)
    private = Ed25519PrivateKey.generate()
    site_uuid = _canonical_uuid(site_uuid, "site")
    cert = domain_keys.certify(site_name, site_uuid, _raw_public(private), epoch)
    site = SiteKeys(site_name, site_uuid, _utc_now(), private, cert)
    write_site_keys(data_dir, site)
    return site


def renew_certificate(
    data_dir: Path, domain_keys: DomainKeys | None = None, *, epoch: int | None = None
) -> SiteKeys:
    """Certify the same site key again under a new epoch (a site rebuilt on a new machine).

    The default epoch is the current one plus one, so nothing the old epoch published is
    ever named again.
    """
    site = load_site_keys(data_dir)
    domain_keys = domain_keys or load_domain_keys(data_dir)
    new_epoch = site.epoch + 1 if epoch is None else epoch
    cert = domain_keys.certify(site.site_name, site.site_uuid, site.public_key, new_epoch)
    renewed = dataclasses.replace(site, certificate=cert)
    write_file(keys_dir(data_dir) / SITE_CERT_FILE, cert.encode(), 0o644)
    return renewed


def load_site_keys(data_dir: Path) -> SiteKeys:
    """The site key and its certificate; they must belong together (not checked: the domain
    signature, which needs the domain's public key: see `verify_certificate`)."""
    directory = keys_dir(data_dir)
    raw = _read_json(directory / SITE_KEY_FILE, "site key")
    cert_path = directory / SITE_CERT_FILE
    try:
        cert_bytes = cert_path.read_bytes()
    except FileNotFoundError:
        raise TierfsError(
            f"{cert_path}: site certificate missing (restore it with 'tierfs key import')",
            ExitCode.CONFIG,
        ) from None
    cert = Certificate.decode(cert_bytes, str(cert_path))
    return SiteKeys.from_json(raw, cert, str(directory / SITE_KEY_FILE))


# --- recovery bundle -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Bundle:
    """What an operator keeps off-site: the domain, its signing key, and (unless the bundle
    is for joining the domain only) one site's key and certificate."""

    created: str
    domain: domain_mod.Domain
    domain_keys: DomainKeys
    site: SiteKeys | None

    def header(self) -> dict[str, Any]:
        """The fields readable without the passphrase (authenticated when encrypted)."""
        return {
            "magic": BUNDLE_MAGIC,
            "format_version": BUNDLE_FORMAT_VERSION,
            "created": self.created,
            "domain_id": self.domain.domain_id,
            "domain_name": self.domain.name,
            "site_name": self.site.site_name if self.site else None,
            "site_uuid": self.site.site_uuid if self.site else None,
        }

    def contents(self) -> dict[str, Any]:
        site = self.site
        return {
            "domain": self.domain.to_json(),
            "domain_key": self.domain_keys.to_json(),
            "site_key": site.to_json() if site else None,
            "site_certificate": _b64(site.certificate.encode()) if site else None,
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, where: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise TierfsError(f"{where}: not base64", ExitCode.CONFIG) from None


def make_bundle(data_dir: Path, *, domain_only: bool = False) -> Bundle:
    """Collect a data directory's keys; the site certificate must verify against the domain."""
    domain = domain_mod.load(data_dir / domain_mod.DOMAIN_FILE)
    domain_keys = load_domain_keys(data_dir)
    check_domain_key(domain, domain_keys, str(keys_dir(data_dir) / DOMAIN_KEY_FILE))
    site = None if domain_only else load_site_keys(data_dir)
    if site is not None:
        verify_certificate(site.certificate, domain_keys.public_key, domain_id=domain.domain_id)
    return Bundle(_utc_now(), domain, domain_keys, site)


def check_domain_key(domain: domain_mod.Domain, keys: DomainKeys, where: str) -> None:
    if keys.domain_id != domain.domain_id:
        raise TierfsError(
            f"{where}: signing key of domain {keys.domain_id}, not of domain "
            f"{domain.name!r} {domain.domain_id}",
            ExitCode.CONFIG,
        )


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The AES-256 key of a passphrase (NFC-normalised, so it types the same everywhere)."""
    text = unicodedata.normalize("NFC", passphrase).encode()
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(text)


def encode_bundle(bundle: Bundle, passphrase: str | None = None) -> bytes:
    """The bundle file: JSON; with a passphrase the contents are AES-256-GCM ciphertext whose
    associated data is the canonical header, so the readable fields cannot be altered."""
    doc = bundle.header()
    contents = bundle.contents()
    if passphrase is None:
        doc["encryption"] = None
        doc["contents"] = contents
        return _json_bytes(doc)
    if not passphrase:
        raise TierfsError("an empty passphrase is not a passphrase", ExitCode.USAGE)
    salt, nonce = secrets.token_bytes(SALT_SIZE), secrets.token_bytes(NONCE_SIZE)
    doc["encryption"] = {
        "kdf": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": _b64(salt),
        "cipher": "aes-256-gcm",
        "nonce": _b64(nonce),
    }
    key = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    ciphertext = AESGCM(key).encrypt(nonce, canonical_json(contents), canonical_json(doc))
    doc["ciphertext"] = _b64(ciphertext)
    return _json_bytes(doc)


def _bundle_doc(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("magic") != BUNDLE_MAGIC:
        raise TierfsError(f"{where}: not a tierfs key bundle", ExitCode.CONFIG)
    if doc.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise TierfsError(
            f"{where}: bundle format {doc.get('format_version')} is not supported (this "
            f"tierfs reads {BUNDLE_FORMAT_VERSION})",
            ExitCode.VERSION,
        )
    return doc


def is_bundle(path: Path) -> bool:
    """True when `path` starts like a bundle (a domain file, for one, does not)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("magic") == BUNDLE_MAGIC


def decode_bundle(data: bytes, where: str, passphrase: Passphrase = None) -> Bundle:
    """Parse, decrypt and check a bundle: its site certificate must verify against its own
    domain key, and the readable header must agree with the contents."""
    doc = _bundle_doc(data, where)
    if doc.get("encryption") is None:
        contents = doc.get("contents")
    else:
        contents = _decrypt(doc, where, passphrase)
    if not isinstance(contents, dict):
        raise TierfsError(f"{where}: bundle has no contents", ExitCode.CONFIG)
    bundle = _bundle_from_contents(doc, contents, where)
    header = bundle.header()
    for field in ("domain_id", "domain_name", "site_name", "site_uuid"):
        if doc.get(field) != header[field]:
            raise VerificationError(f"{where}: header field {field} does not match the contents")
    return bundle


def _decrypt(doc: dict[str, Any], where: str, passphrase: Passphrase) -> Any:
    """The decrypted contents; a wrong passphrase and a damaged file look alike (exit 12)."""
    if passphrase is None:
        raise TierfsError(f"{where}: bundle is encrypted; a passphrase is needed", ExitCode.USAGE)
    text = passphrase() if callable(passphrase) else passphrase
    enc = doc["encryption"]
    try:
        if enc["kdf"] != "scrypt" or enc["cipher"] != "aes-256-gcm":
            raise ValueError(f"unknown kdf or cipher {enc['kdf']!r}/{enc['cipher']!r}")
        n, r, p = (int(enc[k]) for k in ("n", "r", "p"))
        if n & (n - 1) or not 2 <= n <= SCRYPT_MAX_N or not 1 <= r <= SCRYPT_MAX_R:
            raise ValueError("scrypt parameters out of range")
        if not 1 <= p <= SCRYPT_MAX_P:
            raise ValueError("scrypt parameters out of range")
        salt, nonce = _unb64(enc["salt"], where), _unb64(enc["nonce"], where)
        if len(nonce) != NONCE_SIZE or not SALT_SIZE <= len(salt) <= 64:
            raise ValueError("bad salt or nonce size")
        ciphertext = _unb64(doc["ciphertext"], where)
        aad = canonical_json({k: v for k, v in doc.items() if k != "ciphertext"})
    except (KeyError, TypeError, ValueError) as exc:
        raise TierfsError(
            f"{where}: malformed bundle encryption ({exc})", ExitCode.CONFIG
        ) from None
    try:
        plain = AESGCM(_derive(text, salt, n, r, p)).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise VerificationError(
            f"{where}: cannot decrypt the bundle: wrong passphrase, or the file is damaged"
        ) from None
    try:
        return json.loads(plain)
    except ValueError:
        raise VerificationError(f"{where}: decrypted contents are not JSON") from None


def _bundle_from_contents(doc: dict[str, Any], contents: dict[str, Any], where: str) -> Bundle:
    domain = domain_mod.parse(contents.get("domain"), f"{where}: domain")
    domain_keys = DomainKeys.from_json(contents.get("domain_key"), f"{where}: domain_key")
    check_domain_key(domain, domain_keys, f"{where}: domain_key")
    site = None
    if contents.get("site_key") is not None:
        cert_bytes = _unb64(contents.get("site_certificate"), f"{where}: site_certificate")
        cert = verify_certificate(
            cert_bytes,
            domain_keys.public_key,
            domain_id=domain.domain_id,
            what=f"{where}: site_certificate",
        )
        site = SiteKeys.from_json(contents["site_key"], cert, f"{where}: site_key")
    return Bundle(str(doc.get("created", "")), domain, domain_keys, site)


def read_bundle(path: Path, passphrase: Passphrase = None) -> Bundle:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TierfsError(f"{path}: no such file", ExitCode.CONFIG) from None
    except IsADirectoryError:
        raise TierfsError(f"{path}: is a directory, not a bundle", ExitCode.USAGE) from None
    return decode_bundle(data, str(path), passphrase)


def export_bundle(
    data_dir: Path,
    out_file: Path,
    passphrase: str | None = None,
    *,
    domain_only: bool = False,
    force: bool = False,
) -> Bundle:
    """Write the recovery bundle of `data_dir` to `out_file` (mode 0600).

    `domain_only` leaves the site key out: that bundle lets another site join the domain
    (`mkfs --domain`) without receiving this site's private key. An existing `out_file` is
    replaced only with `force`: an old bundle may be the only copy of a key.
    """
    bundle = make_bundle(data_dir, domain_only=domain_only)
    if out_file.exists() and not force:
        raise TierfsError(
            f"{out_file}: already exists (use --force to replace it)", ExitCode.ALREADY_EXISTS
        )
    write_file(out_file, encode_bundle(bundle, passphrase), 0o600, replace=force)
    return bundle


def import_bundle(
    path: Path, data_dir: Path, passphrase: Passphrase = None, *, force: bool = False
) -> Bundle:
    """Install a bundle's domain file and keys into `data_dir` (created if missing).

    Files already there with the same content are left alone; different ones are replaced
    only with `force`, and never a filesystem's domain file by another domain's (its index
    would no longer mount). The bundle's site must match `tierfs.toml`'s `site.name`.
    """
    bundle = read_bundle(path, passphrase)
    make_dirs_durable(data_dir)
    _check_import_target(bundle, data_dir, force)
    domain_file = data_dir / domain_mod.DOMAIN_FILE
    if not _same_domain_file(domain_file, bundle.domain):
        domain_mod.write(domain_file, bundle.domain)
    write_domain_keys(data_dir, bundle.domain_keys)
    if bundle.site is not None:
        write_site_keys(data_dir, bundle.site)
    _fsync_dir(data_dir)
    return bundle


def _check_import_target(bundle: Bundle, data_dir: Path, force: bool) -> None:
    """Refuse to replace different keys without `force`, another domain's file ever when a
    filesystem is there, and a bundle of another site than `tierfs.toml` names."""
    domain_file = data_dir / domain_mod.DOMAIN_FILE
    existing = _existing_domain(domain_file)
    is_filesystem = (data_dir / config.CONFIG_NAME).exists() or (data_dir / "meta").exists()
    if existing is not None and existing.domain_id != bundle.domain.domain_id and is_filesystem:
        raise TierfsError(
            f"{data_dir}: holds a filesystem of domain {existing.name!r} {existing.domain_id}; "
            f"the bundle is for domain {bundle.domain.name!r} {bundle.domain.domain_id}",
            ExitCode.CONFIG,
        )
    if bundle.site is not None and (data_dir / config.CONFIG_NAME).exists():
        site_name = config.load(data_dir).site
        if site_name != bundle.site.site_name:
            raise TierfsError(
                f"{data_dir}: tierfs.toml is for site {site_name!r}; the bundle is for site "
                f"{bundle.site.site_name!r}",
                ExitCode.CONFIG,
            )
    conflicts = _conflicts(bundle, data_dir)
    if conflicts and not force:
        raise TierfsError(
            f"{data_dir}: {', '.join(conflicts)} already exist with other keys "
            f"(use --force to replace them)",
            ExitCode.ALREADY_EXISTS,
        )


def _existing_domain(path: Path) -> domain_mod.Domain | None:
    if not path.exists():
        return None
    try:
        return domain_mod.load(path)
    except TierfsError:
        return None


def _same_domain_file(path: Path, domain: domain_mod.Domain) -> bool:
    existing = _existing_domain(path)
    return existing is not None and existing.to_json() == domain.to_json()


def _conflicts(bundle: Bundle, data_dir: Path) -> list[str]:
    """The files of `data_dir` that the bundle would change (unreadable ones count)."""
    conflicts = []
    domain_file = data_dir / domain_mod.DOMAIN_FILE
    if domain_file.exists() and not _same_domain_file(domain_file, bundle.domain):
        conflicts.append(domain_mod.DOMAIN_FILE)
    directory = keys_dir(data_dir)
    if (directory / DOMAIN_KEY_FILE).exists():
        try:
            same = load_domain_keys(data_dir).to_json() == bundle.domain_keys.to_json()
        except TierfsError:
            same = False
        if not same:
            conflicts.append(f"{KEYS_DIR}/{DOMAIN_KEY_FILE}")
    site = bundle.site
    if site is not None and (directory / SITE_KEY_FILE).exists():
        try:
            have = load_site_keys(data_dir)
            same = have.to_json() == site.to_json() and have.certificate == site.certificate
        except TierfsError:
            same = False
        if not same:
            conflicts.append(f"{KEYS_DIR}/{SITE_KEY_FILE}")
    return conflicts

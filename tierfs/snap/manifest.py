"""The snapshot manifest: what a snapshot is, signed by its site, certified by its domain.

A manifest names one snapshot of one site: the domain, the site (name, UUID, epoch), a
per-site counter, the snapshot id, the time, the schedule, the parent, the root tree id, the
settings minus secrets, and statistics. It is the last object a sync publishes, and the first
a restore reads, so it must verify on a machine that has nothing but the domain's public key.

Encoding: canonical JSON (sorted keys, no whitespace, ASCII escapes; see
`keys.canonical_json`) rather than CBOR. The fields are few, small and mostly text, so a
binary encoding saves nothing that matters; JSON needs no dependency, an operator can read a
manifest with `jq`, and the canonical form is simple to state precisely. Decoding refuses any
byte string that is not the canonical encoding of what it decodes to, so a manifest has one
valid encoding and `decode(b).encode() == b`.

The signed form (`SignedManifest`) is a small binary envelope holding the manifest bytes
verbatim, the site certificate and the site's Ed25519 signature: verification checks the
exact bytes that were signed and decodes them only afterwards.

Layouts and object names: docs/FORMAT.md, "Snapshot manifest".
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from tierfs.config import Config
from tierfs.errors import ExitCode, TierfsError
from tierfs.snap.keys import (
    SiteKeys,
    VerificationError,
    canonical_json,
    pack_envelope,
    parse_canonical,
    unpack_envelope,
    verify_certificate,
    verify_signature,
)

MANIFEST_MAGIC = "tierfs-manifest"
MANIFEST_FORMAT_VERSION = 1
SIGNED_MAGIC = b"TFMF"
SIGNED_FORMAT_VERSION = 1
MANIFEST_PURPOSE = "manifest/v1"
# Features a reader must understand to use a manifest (e.g. encrypted trees, later). A manifest
# that lists one this tierfs does not know is refused with exit code 8.
KNOWN_FEATURES: frozenset[str] = frozenset()

EPOCH_DIGITS, COUNTER_DIGITS = 8, 12
_SNAPSHOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_TREE_ID = re.compile(r"[0-9a-f]{64}")
_FEATURE = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
_MANIFEST_NAME = re.compile(
    rf"sites/([0-9a-f-]{{36}})/manifests/(\d{{{EPOCH_DIGITS}}})-(\d{{{COUNTER_DIGITS}}})-(.+)"
)
# A setting is a credential when one of the words of its name is one of these: it never
# leaves the site in a manifest (`regional.secret_access_key`, `regional.access_key_id`).
SECRET_WORDS = frozenset(
    {
        "secret",
        "password",
        "passwd",
        "passphrase",
        "token",
        "credential",
        "credentials",
        "key",
        "keys",
        "private",
    }
)

MANIFEST_FIELDS = frozenset(
    {
        "magic",
        "format_version",
        "features",
        "domain_id",
        "site_name",
        "site_uuid",
        "site_epoch",
        "counter",
        "snapshot_id",
        "name",
        "time",
        "time_ns",
        "schedule",
        "parent",
        "root",
        "config",
        "stats",
    }
)


def is_secret_name(name: str) -> bool:
    """True for a setting name that names a credential (`secret_access_key`, `api_token`)."""
    words = re.split(r"[_.\-\s]+", name.lower())
    return any(word in SECRET_WORDS for word in words)


def _scrub_url(value: str) -> str:
    """A URL without its user:password part (`s3://user:pw@host/...` would leak them)."""
    if "://" not in value or "@" not in value:
        return value
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return value
    if parts.username is None and parts.password is None:
        return value
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


def _scrub(value: Any) -> Any:
    """Drop credential-named keys at every level; tuples become lists (what JSON gives back)."""
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items() if not is_secret_name(str(k))}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        return _scrub_url(value)
    return value


def public_config(config: Config | Mapping[str, Any]) -> dict[str, Any]:
    """The settings as `{section: {key: value}}`, minus every credential.

    A restore brings back the site's policies from this, never its credentials: those stay
    in the site's own `tierfs.toml` (or the AWS environment).
    """
    if isinstance(config, Config):
        nested: dict[str, dict[str, Any]] = {}
        for (section, key), value in config.values.items():
            nested.setdefault(section, {})[key] = value
        return dict(_scrub(nested))
    return dict(_scrub(config))


def iso_time(time_ns: int) -> str:
    """UTC ISO 8601 with nine fraction digits and `Z`: `2026-11-26T14:59:33.123456789Z`."""
    seconds, fraction = divmod(time_ns, 1_000_000_000)
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{fraction:09d}Z"


class ManifestName(NamedTuple):
    site_uuid: str
    epoch: int
    counter: int
    snapshot_id: str


def manifests_prefix(site_uuid: str) -> str:
    """Where a site's manifests live upstream (list this prefix to find its snapshots)."""
    return f"sites/{uuid.UUID(site_uuid)}/manifests/"


def manifest_name(site_uuid: str, epoch: int, counter: int, snapshot_id: str) -> str:
    """`sites/<site uuid>/manifests/<epoch:08>-<counter:012>-<snapshot id>`.

    Zero-padded decimals make a store's lexicographic listing the site's publication order,
    and the epoch keeps a site rebuilt on a new machine from ever reusing a name.
    """
    _check_range("epoch", epoch, 1, 10**EPOCH_DIGITS)
    _check_range("counter", counter, 0, 10**COUNTER_DIGITS)
    if not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise ValueError(f"bad snapshot id {snapshot_id!r}")
    numbers = f"{epoch:0{EPOCH_DIGITS}d}-{counter:0{COUNTER_DIGITS}d}"
    return f"{manifests_prefix(site_uuid)}{numbers}-{snapshot_id}"


def parse_manifest_name(name: str) -> ManifestName:
    """The parts of a manifest object name; ValueError for any other name."""
    match = _MANIFEST_NAME.fullmatch(name)
    if not match or not _SNAPSHOT_ID.fullmatch(match.group(4)):
        raise ValueError(f"not a manifest object name: {name!r}")
    site_uuid = str(uuid.UUID(match.group(1)))
    if site_uuid != match.group(1):
        raise ValueError(f"not a manifest object name: {name!r}")
    return ManifestName(site_uuid, int(match.group(2)), int(match.group(3)), match.group(4))


def _check_range(what: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise ValueError(f"{what} {value!r} is not an integer in [{low}, {high})")


def _check_optional_text(what: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{what} must be a non-empty string or null, not {value!r}")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """One snapshot of one site. Construction validates every field and drops secrets."""

    domain_id: str
    site_name: str
    site_uuid: str
    site_epoch: int
    counter: int
    snapshot_id: str
    time_ns: int
    root: str
    schedule: str | None = None
    name: str | None = None
    parent: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what, value in (("domain_id", self.domain_id), ("site_uuid", self.site_uuid)):
            if not isinstance(value, str) or str(uuid.UUID(value)) != value:
                raise ValueError(f"{what} {value!r} is not a UUID in 8-4-4-4-12 form")
        if not isinstance(self.site_name, str) or not self.site_name or "/" in self.site_name:
            raise ValueError(f"bad site name {self.site_name!r}")
        _check_range("site_epoch", self.site_epoch, 1, 10**EPOCH_DIGITS)
        _check_range("counter", self.counter, 0, 10**COUNTER_DIGITS)
        _check_range("time_ns", self.time_ns, 0, 253402300800 * 10**9)  # up to year 9999
        if not isinstance(self.snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(self.snapshot_id):
            raise ValueError(f"bad snapshot id {self.snapshot_id!r}")
        if self.parent is not None and (
            not isinstance(self.parent, str) or not _SNAPSHOT_ID.fullmatch(self.parent)
        ):
            raise ValueError(f"bad parent snapshot id {self.parent!r}")
        if not isinstance(self.root, str) or not _TREE_ID.fullmatch(self.root):
            raise ValueError(f"root {self.root!r} is not 64 lower-case hex digits")
        _check_optional_text("schedule", self.schedule)
        _check_optional_text("name", self.name)
        features = tuple(self.features)
        if list(features) != sorted(set(features)) or not all(
            isinstance(f, str) and _FEATURE.fullmatch(f) for f in features
        ):
            raise ValueError(f"features {features!r} must be sorted, unique feature names")
        if not isinstance(self.config, Mapping) or not isinstance(self.stats, Mapping):
            raise ValueError("config and stats must be mappings")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "config", public_config(self.config))
        object.__setattr__(self, "stats", dict(_lists(self.stats)))
        canonical_json({"config": self.config, "stats": self.stats})  # JSON values only

    @classmethod
    def create(
        cls,
        site: SiteKeys,
        *,
        snapshot_id: str,
        counter: int,
        root: str,
        time_ns: int,
        schedule: str | None = None,
        name: str | None = None,
        parent: str | None = None,
        config: Config | Mapping[str, Any] | None = None,
        stats: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """A manifest for `site`: domain, site name, UUID and epoch come from its keys, so
        that `sign` cannot be handed a manifest of another identity."""
        return cls(
            domain_id=site.domain_id,
            site_name=site.site_name,
            site_uuid=site.site_uuid,
            site_epoch=site.epoch,
            counter=counter,
            snapshot_id=snapshot_id,
            time_ns=time_ns,
            root=root,
            schedule=schedule,
            name=name,
            parent=parent,
            config=public_config(config or {}),
            stats=dict(stats or {}),
        )

    @property
    def time(self) -> str:
        return iso_time(self.time_ns)

    @property
    def object_name(self) -> str:
        return manifest_name(self.site_uuid, self.site_epoch, self.counter, self.snapshot_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "magic": MANIFEST_MAGIC,
            "format_version": MANIFEST_FORMAT_VERSION,
            "features": list(self.features),
            "domain_id": self.domain_id,
            "site_name": self.site_name,
            "site_uuid": self.site_uuid,
            "site_epoch": self.site_epoch,
            "counter": self.counter,
            "snapshot_id": self.snapshot_id,
            "name": self.name,
            "time": self.time,
            "time_ns": self.time_ns,
            "schedule": self.schedule,
            "parent": self.parent,
            "root": self.root,
            "config": self.config,
            "stats": self.stats,
        }

    def encode(self) -> bytes:
        """The canonical JSON bytes that the site signs."""
        return canonical_json(self.to_json())


def _lists(value: Any) -> Any:
    """Tuples as lists, at every level, so that a decoded manifest equals the original."""
    if isinstance(value, Mapping):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


def decode(data: bytes, what: str = "manifest") -> Manifest:
    """Parse a manifest's canonical bytes; anything else is refused (exit 12, or 8 for a
    version or a feature this tierfs does not know)."""
    raw = parse_canonical(data, what)
    if raw.get("magic") != MANIFEST_MAGIC:
        raise VerificationError(f"{what}: not a tierfs manifest")
    if raw.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise TierfsError(
            f"{what}: manifest format {raw.get('format_version')} is not supported (this "
            f"tierfs reads {MANIFEST_FORMAT_VERSION}); install a newer tierfs",
            ExitCode.VERSION,
        )
    if set(raw) != MANIFEST_FIELDS:
        raise VerificationError(f"{what}: unexpected fields {sorted(set(raw) ^ MANIFEST_FIELDS)}")
    features = raw["features"]
    if isinstance(features, list):
        unknown = sorted(str(f) for f in features if f not in KNOWN_FEATURES)
        if unknown:
            raise TierfsError(
                f"{what}: needs features {unknown} that this tierfs does not know; install a "
                "newer tierfs",
                ExitCode.VERSION,
            )
    try:
        manifest = Manifest(
            **{k: raw[k] for k in MANIFEST_FIELDS - {"magic", "format_version", "time"}}
        )
    except (TypeError, ValueError) as exc:
        raise VerificationError(f"{what}: malformed ({exc})") from None
    if manifest.encode() != data:
        raise VerificationError(f"{what}: not in canonical form (time, secrets or field types)")
    return manifest


@dataclasses.dataclass(frozen=True)
class SignedManifest:
    """The object published upstream: manifest bytes, site certificate, site signature."""

    manifest: bytes
    certificate: bytes
    signature: bytes

    def encode(self) -> bytes:
        """`TFMF` envelope: manifest, certificate, signature (docs/FORMAT.md)."""
        sections = [self.manifest, self.certificate, self.signature]
        return pack_envelope(SIGNED_MAGIC, SIGNED_FORMAT_VERSION, sections)

    @classmethod
    def decode(cls, data: bytes, what: str = "signed manifest") -> SignedManifest:
        manifest, certificate, signature = unpack_envelope(
            data, SIGNED_MAGIC, SIGNED_FORMAT_VERSION, 3, what
        )
        return cls(manifest, certificate, signature)


def sign(manifest: Manifest, site: SiteKeys) -> SignedManifest:
    """Sign `manifest` with the site key; the manifest must name this site and epoch.

    A mismatch (a renamed site, keys of another epoch) is refused with exit code 3 rather
    than published as a manifest that could never verify.
    """
    cert = site.certificate
    mine = (cert.domain_id, cert.site_name, cert.site_uuid, cert.epoch)
    claimed = (manifest.domain_id, manifest.site_name, manifest.site_uuid, manifest.site_epoch)
    if mine != claimed:
        raise TierfsError(
            f"manifest {manifest.snapshot_id} names domain/site/epoch {claimed}, but the site "
            f"key is certified for {mine}",
            ExitCode.CONFIG,
        )
    if not cert.valid_at(manifest.time_ns):
        raise TierfsError(
            f"site certificate expired at {cert.valid_until}; the snapshot time is {manifest.time}",
            ExitCode.CONFIG,
        )
    body = manifest.encode()
    return SignedManifest(body, cert.encode(), site.sign(body, MANIFEST_PURPOSE))


def verify(
    signed: SignedManifest | bytes,
    domain_public_key: bytes,
    *,
    domain_id: str | None = None,
    what: str = "manifest",
) -> Manifest:
    """The manifest, once its certificate verifies against the domain key, its signature
    against the certified site key, and its site, epoch and time against the certificate.

    Raises `VerificationError` (exit code 12) naming the first check that fails; the
    manifest bytes are decoded only after their signature verified.
    """
    if isinstance(signed, bytes):
        signed = SignedManifest.decode(signed, what)
    cert = verify_certificate(
        signed.certificate, domain_public_key, domain_id=domain_id, what=f"{what}: certificate"
    )
    if not verify_signature(
        cert.site_public_key, signed.signature, signed.manifest, MANIFEST_PURPOSE
    ):
        raise VerificationError(
            f"{what}: signature does not verify with the certified key {cert.fingerprint} of "
            f"site {cert.site_name!r} (the manifest was altered or signed by another key)"
        )
    manifest = decode(signed.manifest, what)
    claimed = (manifest.domain_id, manifest.site_name, manifest.site_uuid, manifest.site_epoch)
    certified = (cert.domain_id, cert.site_name, cert.site_uuid, cert.epoch)
    if claimed != certified:
        raise VerificationError(
            f"{what}: names domain/site/epoch {claimed}, but its certificate is for {certified}"
        )
    if not cert.valid_at(manifest.time_ns):
        raise VerificationError(
            f"{what}: made at {manifest.time}, after its certificate expired ({cert.valid_until})"
        )
    return manifest

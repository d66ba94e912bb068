"""The dedup domain: the content-id key and the chunker parameters shared by a domain's sites.

Two sites deduplicate against each other only if they name and cut identical data
identically, so the id key and the chunker live in a domain file that every site of the
domain shares (`mkfs --domain FILE`), not in per-site settings. The id key never changes for
a domain. Other keys (later: signing certificates, encryption) are derived from a separate
`secret`, never from the id key, so that rotating them cannot change content ids.

The file is JSON (docs/FORMAT.md, "Domain file"):

    {"magic": "tierfs-domain", "format_version": 1, "domain_id": UUID, "name": str,
     "id_key": 64 hex digits, "secret": 64 hex digits, "created": ISO 8601,
     "chunker": {"algorithm": "fastcdc2020", "min_size": int, "avg_size": int,
                 "max_size": int, "normalization": int, "fixed_size": int}}
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import secrets
import uuid
from pathlib import Path
from typing import Any

from tierfs.errors import ExitCode, TierfsError

DOMAIN_MAGIC = "tierfs-domain"
DOMAIN_FORMAT_VERSION = 1
DOMAIN_FILE = "domain.json"


@dataclasses.dataclass(frozen=True)
class ChunkerParams:
    """How data is cut: FastCDC 2020 sizes, plus the block size of the fixed-size policy."""

    algorithm: str = "fastcdc2020"
    min_size: int = 64 * 1024
    avg_size: int = 256 * 1024
    max_size: int = 1024 * 1024
    normalization: int = 1
    fixed_size: int = 256 * 1024

    def validate(self, where: str) -> None:
        if self.algorithm != "fastcdc2020":
            raise TierfsError(f"{where}: unknown chunker {self.algorithm!r}", ExitCode.CONFIG)
        if not 256 <= self.min_size <= self.avg_size <= self.max_size <= 16 << 20:
            raise TierfsError(f"{where}: chunker sizes out of order or range", ExitCode.CONFIG)
        if not 4096 <= self.fixed_size <= 16 << 20:
            raise TierfsError(f"{where}: chunker fixed_size out of range", ExitCode.CONFIG)


@dataclasses.dataclass(frozen=True)
class Domain:
    domain_id: str
    name: str
    id_key: bytes
    secret: bytes
    created: str
    chunker: ChunkerParams

    @property
    def gear_seed(self) -> int:
        """The FastCDC gear seed: derived from the id key, so cut points are domain-private."""
        digest = hashlib.blake2b(self.id_key, person=b"tierfs-gear-seed").digest()
        return (int.from_bytes(digest[:8], "little") >> 2) or 1

    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose`, derived from the secret (never from the id key)."""
        return hashlib.blake2b(purpose.encode(), key=self.secret, digest_size=32).digest()

    def to_json(self) -> dict[str, Any]:
        return {
            "magic": DOMAIN_MAGIC,
            "format_version": DOMAIN_FORMAT_VERSION,
            "domain_id": self.domain_id,
            "name": self.name,
            "id_key": self.id_key.hex(),
            "secret": self.secret.hex(),
            "created": self.created,
            "chunker": dataclasses.asdict(self.chunker),
        }


def generate(name: str) -> Domain:
    return Domain(
        domain_id=str(uuid.uuid4()),
        name=name,
        id_key=secrets.token_bytes(32),
        secret=secrets.token_bytes(32),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        chunker=ChunkerParams(),
    )


def parse(raw: Any, where: str) -> Domain:
    """Validate a domain document; refuse unknown versions and malformed keys clearly."""
    if not isinstance(raw, dict) or raw.get("magic") != DOMAIN_MAGIC:
        raise TierfsError(f"{where}: not a tierfs domain file", ExitCode.CONFIG)
    version = raw.get("format_version")
    if version != DOMAIN_FORMAT_VERSION:
        raise TierfsError(
            f"{where}: domain format {version} is not supported (this tierfs reads "
            f"{DOMAIN_FORMAT_VERSION})",
            ExitCode.VERSION,
        )
    try:
        chunker = ChunkerParams(**raw["chunker"])
        domain = Domain(
            domain_id=str(uuid.UUID(raw["domain_id"])),
            name=str(raw["name"]),
            id_key=bytes.fromhex(raw["id_key"]),
            secret=bytes.fromhex(raw["secret"]),
            created=str(raw["created"]),
            chunker=chunker,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TierfsError(f"{where}: malformed domain file ({exc})", ExitCode.CONFIG) from None
    if len(domain.id_key) != 32 or len(domain.secret) != 32:
        raise TierfsError(f"{where}: domain keys must be 32 bytes", ExitCode.CONFIG)
    chunker.validate(where)
    return domain


def load(path: Path) -> Domain:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise TierfsError(f"{path}: domain file missing", ExitCode.CONFIG) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TierfsError(f"{path}: domain file is not JSON ({exc})", ExitCode.CONFIG) from None
    return parse(raw, str(path))


def write(path: Path, domain: Domain) -> None:
    """Write atomically with mode 0600: the file holds the domain's keys."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(domain.to_json(), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)

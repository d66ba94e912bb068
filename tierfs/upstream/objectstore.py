"""The object-store interface of the upstream tiers, its errors, and `open_store`.

Every upstream object is written once under a content-derived name and never replaced, so the
interface has no overwrite: `put` of an existing name succeeds only when the content is the
same (a retried upload whose first try landed) and raises `ObjectExists` otherwise. The
methods are synchronous and may block for a long time (network, fsync): callers run them in
worker threads, never on the FUSE loop. Implementations are safe to call from several threads
at once.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from tierfs.errors import ExitCode, TierfsError

if TYPE_CHECKING:
    from tierfs.config import Config

MIB = 1 << 20
# A single S3 PUT carries at most 5 GiB; tierfs never uses multipart uploads.
S3_SINGLE_PUT_LIMIT_MB = 5 * 1024
MAX_NAME_BYTES = 1024
CHECKSUM_MODES = ("when_supported", "when_required")

_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ObjectStoreError(TierfsError):
    """A store operation failed; the message names the store and the object."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.IO) -> None:
        super().__init__(message, exit_code)


class ObjectMissing(ObjectStoreError):
    """The named object does not exist (`get`)."""

    def __init__(self, store: str, name: str) -> None:
        super().__init__(f"regional store {store}: object {name} is missing", ExitCode.IO)
        self.name = name


class ObjectExists(ObjectStoreError):
    """`put` found the name taken by different content: names are written once."""

    def __init__(self, store: str, name: str, detail: str) -> None:
        super().__init__(
            f"regional store {store}: object {name} already exists with other content "
            f"({detail}); objects are never replaced",
            ExitCode.IO,
        )
        self.name = name


class ObjectTooLarge(ObjectStoreError):
    """`put` refused an object above `regional.max_object_mb` (objects are single PUTs)."""

    def __init__(self, store: str, name: str, size: int, limit: int) -> None:
        super().__init__(
            f"regional store {store}: object {name} is {size} bytes, above "
            f"regional.max_object_mb ({limit // MIB} MiB); objects are written in one PUT",
            ExitCode.CONFIG,
        )
        self.name = name


class StoreUnavailable(ObjectStoreError):
    """The store cannot be reached now (connection, timeouts, server errors, missing mount).

    Transient by nature: the caller keeps its work queued and tries again later.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.IO)


class StoreRefused(ObjectStoreError):
    """The store answers but refuses us: credentials, permissions, no such bucket or directory.

    Retrying does not help; the operator must fix the settings.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.CONFIG)


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    """The `[regional]` settings an object store needs, except the URL.

    Empty strings mean "not set": no endpoint is AWS itself, no region or credentials are
    taken from the standard AWS environment variables, profile and instance metadata.
    """

    endpoint: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    profile: str = ""
    checksum_mode: str = "when_supported"
    max_connections: int = 10
    max_object_mb: int = 64
    retries: int = 4
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise _config_error(
                "regional.access_key_id and regional.secret_access_key must be set together"
            )
        if self.access_key_id and self.profile:
            raise _config_error("set either regional.profile or explicit keys, not both")
        if self.checksum_mode not in CHECKSUM_MODES:
            raise _config_error(f"regional.checksum_mode must be one of {CHECKSUM_MODES}")
        if not 1 <= self.max_object_mb <= S3_SINGLE_PUT_LIMIT_MB:
            raise _config_error(
                f"regional.max_object_mb must be between 1 and {S3_SINGLE_PUT_LIMIT_MB}"
            )

    @property
    def max_object_bytes(self) -> int:
        return self.max_object_mb * MIB

    @classmethod
    def from_config(cls, config: Config) -> StoreSettings:
        """The `[regional]` section of a loaded `tierfs.toml`."""
        values = {f.name: config.get("regional", f.name) for f in dataclasses.fields(cls)}
        return cls(**values)


class ObjectStore(abc.ABC):
    """A flat namespace of immutable objects (see the module docstring).

    Names are `/`-separated segments of `[A-Za-z0-9._-]`, none starting with `.`; a name must
    not also be the directory of another name (`a` and `a/b`), since the local store maps names
    onto paths. `check_name` enforces this, so both backends accept the same names.
    """

    url: str

    @abc.abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store `data` under `name` durably, never replacing an existing object.

        An identical object already there is success (a retry); different content raises
        `ObjectExists`; more than `max_object_mb` raises `ObjectTooLarge`.
        """

    @abc.abstractmethod
    def get(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes `[start, end)` of the object, like slicing: a range past the end is cut short.

        Raises `ObjectMissing` when there is no such object.
        """

    @abc.abstractmethod
    def head(self, name: str) -> int | None:
        """The object's size, or None when it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Names that start with `prefix` (any string, not only whole segments).

        The order is not specified: AWS and the local store list in byte order, SeaweedFS
        directory by directory. The first item costs a request, which makes
        `next(store.list(), None)` a cheap reachability and credentials check.
        """

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object; a missing one is not an error (deletes are retried by GC)."""

    def close(self) -> None:  # noqa: B027 - optional hook; most stores hold nothing
        """Release connections; the store must not be used afterwards."""

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _config_error(message: str) -> TierfsError:
    return TierfsError(message, ExitCode.CONFIG)


def check_name(name: str) -> str:
    """Return `name` if it is a valid object name, else raise ValueError (a caller's bug)."""
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"object name longer than {MAX_NAME_BYTES} bytes: {name[:60]}...")
    if not name or not all(_SEGMENT.fullmatch(part) for part in name.split("/")):
        raise ValueError(f"invalid object name {name!r}")
    return name


def valid_name(name: str) -> bool:
    """Whether `name` is a valid object name (listings skip foreign entries that are not)."""
    try:
        check_name(name)
    except ValueError:
        return False
    return True


def check_range(start: int | None, end: int | None) -> tuple[int, int | None]:
    """Normalise a `get` range to (start, end or None); negative or reversed is a bug."""
    first = 0 if start is None else start
    if first < 0 or (end is not None and end < first):
        raise ValueError(f"invalid byte range [{start}, {end})")
    return first, end


def open_store(url: str, settings: StoreSettings, *, create: bool = False) -> ObjectStore:
    """The store named by `url`: `file:///abs/path` or `s3://bucket[/prefix]`.

    A local directory must exist unless `create` (for `mkfs`) makes it; a bucket is never
    created. Opening does no network request: the first operation finds out whether the
    store is reachable. A malformed URL raises `TierfsError(CONFIG)`.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        from tierfs.upstream.localstore import LocalStore

        return LocalStore(_local_path(url, parts.netloc, parts.path), settings, create=create)
    if parts.scheme == "s3":
        from tierfs.upstream.s3store import S3Store

        bucket, prefix = _bucket_and_prefix(url, parts.netloc, parts.path)
        return S3Store(bucket, prefix, settings)
    raise TierfsError(
        f"regional.url {url!r}: expected file:///absolute/path or s3://bucket/prefix",
        ExitCode.CONFIG,
    )


def _local_path(url: str, host: str, path: str) -> Path:
    if host not in ("", "localhost") or not path.startswith("/"):
        raise TierfsError(
            f"regional.url {url!r}: a file URL needs an absolute path (file:///var/lib/x)",
            ExitCode.CONFIG,
        )
    return Path(unquote(path))


def _bucket_and_prefix(url: str, bucket: str, path: str) -> tuple[str, str]:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise TierfsError(
            f"regional.url {url!r}: {bucket!r} is not a valid bucket name "
            "(3-63 characters: lower-case letters, digits, '.', '-')",
            ExitCode.CONFIG,
        )
    prefix = path.strip("/")
    if prefix:
        try:
            check_name(prefix)
        except ValueError:
            raise TierfsError(
                f"regional.url {url!r}: invalid prefix {prefix!r}", ExitCode.CONFIG
            ) from None
    return bucket, prefix

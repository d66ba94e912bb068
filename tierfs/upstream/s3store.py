"""The `s3://bucket/prefix` object store, through boto3.

Write-once on S3 rests on `If-None-Match: *`: the server refuses (412) a PUT to a name that
exists. A 412 is also what a retried PUT gets when its first try landed but the answer was
lost, so a 412 is followed by a HEAD: same size and same BLAKE3 (stored at put time as user
metadata `x-amz-meta-tierfs-blake3`; an object without it is read back and compared) is
success, anything else `ObjectExists`. Objects are single PUTs, because conditional multipart
completion is not honoured by every server (Ceph RGW 16 ignores it).

Retries happen at two levels. botocore's "standard" mode retries each HTTP request on
throttling, 5xx and connection errors with exponential backoff and jitter. It cannot cover
reading a GET body (that happens after it returns), and in a long outage its retry quota runs
dry; so every operation also runs in a loop of ours that retries connection errors, truncated
bodies and conditional-write conflicts (409), with full-jitter exponential backoff, at most
`retries` times and only while `timeout * (retries + 1)` seconds have not passed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bce
from blake3 import blake3
from botocore.config import Config as BotoConfig

from tierfs.errors import ExitCode, TierfsError
from tierfs.upstream.objectstore import (
    ObjectExists,
    ObjectMissing,
    ObjectStore,
    ObjectStoreError,
    ObjectTooLarge,
    StoreRefused,
    StoreSettings,
    StoreUnavailable,
    check_name,
    check_range,
    valid_name,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CHECKSUM_META = "tierfs-blake3"  # sent as the header x-amz-meta-tierfs-blake3
BACKOFF_BASE = 0.25
BACKOFF_CAP = 20.0

# Errors of the connection, worth another try. SSLError (a ConnectionError) is not: a bad
# certificate stays bad.
_RETRYABLE = (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError)
_NO_CREDENTIALS = (
    bce.NoCredentialsError,
    bce.PartialCredentialsError,
    bce.CredentialRetrievalError,
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
    }
)
_BUSY_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)


class S3Store(ObjectStore):
    """Objects under `s3://bucket/prefix/NAME` (see the module docstring)."""

    def __init__(self, bucket: str, prefix: str, settings: StoreSettings) -> None:
        self.bucket = bucket
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._prefix = f"{prefix}/" if prefix else ""
        self._max_bytes = settings.max_object_bytes
        self._retries = settings.retries
        self._budget = settings.timeout * (settings.retries + 1)
        self._client = _make_client(settings, self.url)
        self.endpoint: str = self._client.meta.endpoint_url

    def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        if len(data) > self._max_bytes:
            raise ObjectTooLarge(self.url, name, len(data), self._max_bytes)
        digest = blake3(data).hexdigest()

        def attempt() -> None:
            try:
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    IfNoneMatch="*",
                    Metadata={CHECKSUM_META: digest},
                )
            except bce.ClientError as exc:
                if _status(exc) != 412:
                    raise
                self._confirm_existing(key, name, data, digest)
                return
            log.debug("regional store %s: put %s (%d bytes)", self.url, name, len(data))

        self._call("put", name, attempt)

    def get(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        key = self._key(name)
        first, stop = check_range(start, end)
        if stop == first:
            if self.head(name) is None:
                raise ObjectMissing(self.url, name)
            return b""
        ranged = first > 0 or stop is not None
        extra = {"Range": f"bytes={first}-{'' if stop is None else stop - 1}"} if ranged else {}

        def attempt() -> bytes:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=key, **extra)
            except bce.ClientError as exc:
                if _code(exc) == "NoSuchKey":
                    raise ObjectMissing(self.url, name) from None
                if _status(exc) == 416:  # the range starts at or past the end
                    return b""
                raise
            with contextlib.closing(response["Body"]) as body:
                data: bytes = body.read()
            if ranged and "ContentRange" not in response:  # the server ignored the range
                return data[first:stop]
            return data

        return self._call("get", name, attempt)

    def head(self, name: str) -> int | None:
        key = self._key(name)

        def attempt() -> int | None:
            try:
                response = self._client.head_object(Bucket=self.bucket, Key=key)
            except bce.ClientError as exc:
                # A HEAD answer has no body: a missing bucket is a 404 too, told apart by
                # the next list or put.
                if _status(exc) == 404:
                    return None
                raise
            return int(response["ContentLength"])

        return self._call("head", name, attempt)

    def list(self, prefix: str = "") -> Iterator[str]:
        request: dict[str, str] = {"Bucket": self.bucket, "Prefix": self._prefix + prefix}
        while True:
            page = self._call("list", f"{prefix}*", functools.partial(self._list_page, request))
            for entry in page.get("Contents", []):
                name = entry["Key"][len(self._prefix) :]
                if valid_name(name):
                    yield name
            if not page.get("IsTruncated"):
                return
            request = {**request, "ContinuationToken": page["NextContinuationToken"]}

    def delete(self, name: str) -> None:
        key = self._key(name)

        def attempt() -> None:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key)
            except bce.ClientError as exc:
                if _code(exc) != "NoSuchKey":
                    raise

        self._call("delete", name, attempt)

    def close(self) -> None:
        self._client.close()

    def _key(self, name: str) -> str:
        return self._prefix + check_name(name)

    def _list_page(self, request: dict[str, str]) -> dict[str, Any]:
        page: dict[str, Any] = self._client.list_objects_v2(**request)
        return page

    def _confirm_existing(self, key: str, name: str, data: bytes, digest: str) -> None:
        """After a 412: succeed if the stored object is this one, else `ObjectExists`."""
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except bce.ClientError as exc:
            if _status(exc) != 404:
                raise
            raise ObjectStoreError(
                f"regional store {self.url}: put {name}: refused as existing, then not found "
                "(deleted meanwhile?)"
            ) from None
        size = int(response["ContentLength"])
        if size != len(data):
            raise ObjectExists(self.url, name, f"{size} bytes stored, {len(data)} bytes put")
        stored = response.get("Metadata", {}).get(CHECKSUM_META)
        if stored is None:  # written by another tool: compare the bytes themselves
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                same = body.read() == data
        else:
            same = stored == digest
        if not same:
            raise ObjectExists(self.url, name, "same size, other content")
        log.info("regional store %s: %s was already stored (an earlier try landed)", self.url, name)

    def _call(self, op: str, name: str, fn: Callable[[], T]) -> T:
        """Run `fn` with our retries (module docstring); translate what escapes them."""
        deadline = time.monotonic() + self._budget
        attempt = 0
        while True:
            try:
                return fn()
            except bce.ClientError as exc:
                if _code(exc) != "ConditionalRequestConflict":
                    raise self._client_error(op, name, exc) from exc
                error: Exception = exc
            except bce.SSLError as exc:
                raise StoreRefused(
                    f"regional store {self.url}: TLS error: {_oneline(exc)}"
                ) from exc
            except _NO_CREDENTIALS as exc:
                raise StoreRefused(
                    f"regional store {self.url}: no usable credentials ({_oneline(exc)}); set "
                    "regional.access_key_id/secret_access_key or regional.profile, or the AWS "
                    "environment"
                ) from exc
            except _RETRYABLE as exc:
                error = exc
            attempt += 1
            delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
            if attempt > self._retries or time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"regional store {self.url}: {op} {name}: cannot reach {self.endpoint} "
                    f"({_oneline(error)}); gave up after {attempt} attempts"
                ) from error
            log.warning(
                "regional store %s: %s %s: %s; retry %d of %d in %.2f s",
                self.url,
                op,
                name,
                _oneline(error),
                attempt,
                self._retries,
                delay,
            )
            time.sleep(delay)

    def _client_error(self, op: str, name: str, exc: bce.ClientError) -> ObjectStoreError:
        code, status = _code(exc), _status(exc)
        where = f"regional store {self.url}: {op} {name}"
        if code in _DENIED_CODES or status == 403:
            return StoreRefused(
                f"{where}: access denied ({code}); check regional.access_key_id/"
                "secret_access_key, regional.profile or the AWS credentials"
            )
        if code == "NoSuchBucket":
            return StoreRefused(f"{where}: bucket {self.bucket} does not exist at {self.endpoint}")
        if code in _BUSY_CODES or status == 429 or status >= 500:
            return StoreUnavailable(
                f"{where}: the server stays busy or failing ({code}, HTTP {status}) after "
                f"{self._retries} retries"
            )
        message = _oneline(exc.response.get("Error", {}).get("Message") or exc)
        return ObjectStoreError(f"{where}: {code} (HTTP {status}): {message}")


def _make_client(settings: StoreSettings, url: str) -> Any:
    """A thread-safe S3 client: timeouts, pool size, retries and checksum mode from settings.

    Path-style addressing for a custom endpoint (S3 clones often lack virtual-host DNS); AWS
    itself gets botocore's default.
    """
    try:
        session = boto3.session.Session(
            aws_access_key_id=settings.access_key_id or None,
            aws_secret_access_key=settings.secret_access_key or None,
            profile_name=settings.profile or None,
            region_name=settings.region or None,
        )
        config = BotoConfig(
            connect_timeout=settings.timeout,
            read_timeout=settings.timeout,
            max_pool_connections=settings.max_connections,
            retries={"mode": "standard", "total_max_attempts": settings.retries + 1},
            request_checksum_calculation=settings.checksum_mode,
            response_checksum_validation=settings.checksum_mode,
            s3={"addressing_style": "path"} if settings.endpoint else None,
            user_agent_extra="tierfs",
        )
        return session.client("s3", endpoint_url=settings.endpoint or None, config=config)
    except bce.ProfileNotFound:
        raise StoreRefused(
            f"regional store {url}: AWS profile {settings.profile!r} not found"
        ) from None
    except ValueError as exc:  # botocore's invalid endpoint
        raise TierfsError(
            f"regional.endpoint {settings.endpoint!r}: {_oneline(exc)}", ExitCode.CONFIG
        ) from None


def _code(exc: bce.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: bce.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _oneline(value: object) -> str:
    return " ".join(str(value).split())[:300]

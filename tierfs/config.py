"""The `tierfs.toml` schema: every setting, its type, default and meaning, in one table.

`mkfs` renders the whole table as a commented file, so an operator sees every knob and its
default; `load` validates a file against the same table and names the offending key on error.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from tierfs.errors import ExitCode, TierfsError
from tierfs.snap.schedule import DEFAULT_SCHEDULES, Schedule, parse_schedules
from tierfs.upstream.objectstore import CHECKSUM_MODES, S3_SINGLE_PUT_LIMIT_MB, StoreSettings

CONFIG_NAME = "tierfs.toml"
CONFIG_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Setting:
    """One key of `tierfs.toml`."""

    section: str
    key: str
    type: type[Any]
    default: Any
    doc: str
    minimum: float | None = None
    default_doc: str | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "site",
        "name",
        str,
        "",
        "Site name, unique within the dedup domain.",
        default_doc="the host name",
    ),
    Setting(
        "mount",
        "allow_other",
        bool,
        True,
        "Let users other than the mounting one access the mount (only applies when root mounts;\n"
        "# set to false, or pass -o noallow_other, for a private mount).",
    ),
    Setting("mount", "attr_timeout", float, 60.0, "Seconds the kernel may cache attributes.", 0.0),
    Setting(
        "mount", "entry_timeout", float, 60.0, "Seconds the kernel may cache name lookups.", 0.0
    ),
    Setting(
        "mount",
        "read_ahead_kb",
        int,
        1024,
        "Kernel read-ahead of the mount in KiB (the FUSE default is 128): larger reads cost\n"
        "# fewer requests. Set when mounting as root; 0 keeps the kernel's default.",
        0,
    ),
    Setting(
        "mount",
        "atime",
        str,
        "relatime",
        'Access time policy: "relatime" (update when older than mtime/ctime or a day),\n'
        '# or "noatime" (never update).',
    ),
    Setting(
        "metadata",
        "commit_interval",
        float,
        0.5,
        "Seconds between group commits of the metadata index; fsync commits at once.",
        0.01,
    ),
    Setting(
        "metadata",
        "max_batch_ops",
        int,
        20000,
        "Commit early once a group commit holds this many changes.",
        1,
    ),
    Setting(
        "metadata",
        "preallocate_mb",
        int,
        64,
        "Disk space kept allocated ahead of the metadata index so commits never hit ENOSPC.",
        8,
    ),
    Setting(
        "staging",
        "reserve_mb",
        int,
        256,
        "Free space on the data directory's disk kept back from file data, so metadata\n"
        "# changes (unlink, rmdir) still work when the disk is full. Writers get ENOSPC below it.",
        0,
    ),
    Setting(
        "staging",
        "max_mb",
        int,
        0,
        "Largest amount of staged (not yet sealed) data in MiB; writers get ENOSPC above it.\n"
        "# 0 means bounded by the disk and the reserve only.",
        0,
    ),
    Setting(
        "seal",
        "quiet_period",
        float,
        2.0,
        "Seconds a closed file stays quiet before its staged data is sealed into chunks.",
        0.0,
    ),
    Setting(
        "seal",
        "idle_delay",
        float,
        0.5,
        "Closed files are sealed only after the filesystem has had no request for this long\n"
        "# (background work yields to applications); age and staging pressure seal anyway.",
        0.0,
    ),
    Setting(
        "seal",
        "max_dirty_age",
        float,
        300.0,
        "Seconds after which staged data is sealed even while its file is still open.",
        0.0,
    ),
    Setting(
        "seal",
        "staging_high_mb",
        int,
        1024,
        "Staged data above this size is sealed at once, oldest first.",
        0,
    ),
    Setting("seal", "batch_mb", int, 64, "Staged data sealed per round (bounds memory use).", 1),
    Setting(
        "seal",
        "stream_behind_mb",
        int,
        64,
        "A file being written sequentially is sealed behind its writer once this much of it\n"
        "# lies behind the write position, while it is still open, so that its bytes reach the\n"
        "# disk once, as chunks, instead of also from staging (0: only after the close).",
        0,
    ),
    Setting(
        "seal",
        "zstd_level",
        int,
        3,
        "zstd level for chunks (0 stores them raw; chunks that do not shrink are stored raw).",
        0,
    ),
    Setting(
        "seal",
        "fixed_chunking_patterns",
        str,
        "*.db,*.sqlite,*.qcow2,*.img,*.vmdk,*.vdi",
        "File names (comma-separated globs) cut into fixed-size blocks instead of FastCDC:\n"
        "# files rewritten in place, such as databases and VM images.",
    ),
    Setting(
        "seal",
        "compact_min_extents",
        int,
        64,
        "A file is compacted (re-chunked) only when it has more extents than this...",
        1,
    ),
    Setting(
        "seal",
        "compact_ratio",
        float,
        4.0,
        "...and more than this many times the extents its size needs.",
        1.0,
    ),
    Setting("hot", "segment_mb", int, 64, "Size at which a hot-tier segment file is closed.", 1),
    Setting(
        "hot",
        "max_mb",
        int,
        0,
        "Largest hot tier (chunk segments) in MiB; 0 means bounded by the disk only.",
        0,
    ),
    Setting(
        "cache",
        "chunk_cache_mb",
        int,
        128,
        "Memory for decompressed chunks, so that small reads do not decompress a chunk twice.",
        1,
    ),
    Setting(
        "regional",
        "url",
        str,
        "",
        "Where the regional tier keeps its objects: file:///absolute/path or\n"
        "# s3://bucket/prefix. Empty: no regional tier.",
    ),
    Setting(
        "regional",
        "endpoint",
        str,
        "",
        "S3 endpoint URL, e.g. http://10.0.0.5:8333 for an S3-compatible server; empty: AWS.",
    ),
    Setting(
        "regional",
        "region",
        str,
        "",
        "S3 region; empty: from the AWS environment or profile (us-east-1 if none).",
    ),
    Setting(
        "regional",
        "access_key_id",
        str,
        "",
        "S3 access key. Empty (with secret_access_key): the standard AWS credential chain\n"
        "# (AWS_* environment variables, ~/.aws profiles, instance role).",
    ),
    Setting(
        "regional",
        "secret_access_key",
        str,
        "",
        "S3 secret key, set together with access_key_id (then keep this file mode 0600).",
    ),
    Setting(
        "regional",
        "profile",
        str,
        "",
        "AWS profile (~/.aws/config, ~/.aws/credentials) for credentials and region, instead\n"
        "# of keys here; empty: the default chain.",
    ),
    Setting(
        "regional",
        "checksum_mode",
        str,
        "when_supported",
        '"when_supported" (boto3\'s default: checksums on every upload and download) or\n'
        '# "when_required" (only where S3 demands them), for older servers that reject them.',
    ),
    Setting(
        "regional",
        "max_connections",
        int,
        10,
        "Connections to the S3 store, and so the most requests in flight at once.",
        1,
    ),
    Setting(
        "regional",
        "max_object_mb",
        int,
        64,
        "Largest object in MiB. Every object is written with one PUT (never multipart);\n"
        f"# bigger ones are refused. At most {S3_SINGLE_PUT_LIMIT_MB} (the S3 limit of one PUT).",
        1,
    ),
    Setting(
        "regional",
        "retries",
        int,
        4,
        "Retries of a failed request (throttling, server or connection errors), with\n"
        "# exponential backoff and jitter; then the work waits for the next attempt.",
        0,
    ),
    Setting(
        "regional",
        "timeout",
        float,
        30.0,
        "Seconds to wait for a connection, or for the next data of an answer, before a retry.",
        0.1,
    ),
    Setting(
        "regional",
        "pack_mb",
        int,
        8,
        "Target size of a pack object in MiB: new chunks travel in packs, so that small files\n"
        "# do not cost a request each.",
        1,
    ),
    Setting(
        "regional",
        "uploads",
        int,
        4,
        "Packs uploaded at the same time.",
        1,
    ),
    Setting(
        "regional",
        "bandwidth_mbit",
        float,
        0.0,
        "Cap on the upload rate in Mbit/s, so that replication leaves room on a thin WAN\n"
        "# link; 0: no cap.",
        0.0,
    ),
    Setting(
        "regional",
        "queue_max",
        int,
        32,
        "Snapshots waiting to be sent, at most. Beyond it, older unsent snapshots of a\n"
        "# schedule are superseded by its newest (kept locally, not sent) and status raises an\n"
        "# alarm.",
        1,
    ),
    Setting(
        "regional",
        "read_timeout",
        float,
        30.0,
        "Seconds a read of data that is only upstream (evicted, or a damaged local copy) may\n"
        "# wait for the regional store before it fails with EIO.",
        0.1,
    ),
    Setting(
        "evict",
        "high_pct",
        int,
        90,
        "With a regional store: when local chunk copies (hot + cold) pass this share of the\n"
        "# local capacity, copies of chunks that are durable upstream are dropped...",
        1,
    ),
    Setting("evict", "low_pct", int, 80, "...down to this share.", 0),
    Setting(
        "evict",
        "capacity_mb",
        int,
        0,
        "Local capacity for chunk copies in MiB; 0: hot.max_mb (or the data disk's size)\n"
        "# plus the cold device's capacity.",
        0,
    ),
    Setting("evict", "interval", float, 10.0, "Seconds between checks of the watermark.", 0.1),
    Setting(
        "evict",
        "keep_fetched",
        bool,
        True,
        "Keep data read back from the regional store in the hot tier (below the high\n"
        "# watermark), so that the next read is local.",
    ),
    Setting(
        "evict",
        "prefetch",
        bool,
        False,
        "Fetch evicted data back in the background while local copies are below the low\n"
        "# watermark (with keep_fetched). `tierfs restore site` turns it on for a rebuilt site.",
    ),
    Setting(
        "cold",
        "device",
        str,
        "",
        "The zoned device of the cold tier: emulated:SIZE (a file under DATA_DIR/cold),\n"
        "# zonefs:DIR or block:/dev/...; empty: no cold tier. Set by mkfs --zone-device.",
    ),
    Setting(
        "cold",
        "cold_after",
        float,
        86400.0,
        "Seconds without a read or write after which a hot segment's chunks migrate to zones.",
        0.0,
    ),
    Setting(
        "cold",
        "hot_high_pct",
        int,
        85,
        "Above this share of the hot tier's room (hot.max_mb, else the data directory's\n"
        "# size), the least recently used segments migrate...",
        1,
    ),
    Setting("cold", "hot_low_pct", int, 70, "...down to this share.", 0),
    Setting("cold", "batch_mb", int, 64, "Chunk data migrated per zone append.", 1),
    Setting(
        "cold",
        "reserve_zones",
        int,
        2,
        "Empty zones kept back for reclaim (relocating live records out of dirty zones).",
        1,
    ),
    Setting(
        "cold",
        "promote_on_read",
        bool,
        False,
        "Copy chunks read from zones back to the hot tier (in the background). Zones read\n"
        "# about as fast as the hot tier on NVMe, so this mostly trades writes for locality.",
    ),
    Setting(
        "cold",
        "min_garbage",
        float,
        0.25,
        "A zone is relocated only when at least this share of it is garbage (any share\n"
        "# while migration waits for room).",
        0.0,
    ),
    Setting(
        "snapshots",
        "dir_name",
        str,
        ".snapshots",
        "Name, in the root of the mount, of the read-only directory that lists the local\n"
        "# snapshots by id (each a point-in-time view of the whole tree). The name is reserved:\n"
        "# it cannot be created, removed or renamed, and hides a real entry of that name.",
    ),
    Setting(
        "snapshots",
        "show_dir",
        bool,
        False,
        "List the snapshot directory in the root's listing (ls -a); when false it is still\n"
        "# reached by its name (cd /mnt/.snapshots), but find, du and backups of the mount\n"
        "# do not descend into every snapshot.",
    ),
    Setting(
        "log",
        "level",
        str,
        "info",
        'Log level of the daemon: "debug", "info", "warning" or "error".',
    ),
)

_LOG_LEVELS = ("debug", "info", "warning", "error")
_ATIME_POLICIES = ("relatime", "noatime")


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated settings, addressed as `config.get("mount", "attr_timeout")`."""

    values: dict[tuple[str, str], Any]
    schedules: tuple[Schedule, ...] = DEFAULT_SCHEDULES

    def get(self, section: str, key: str) -> Any:
        return self.values[(section, key)]

    @property
    def site(self) -> str:
        return str(self.values[("site", "name")])


def default_site_name() -> str:
    return socket.gethostname().split(".")[0] or "site"


def defaults(site: str | None = None) -> Config:
    values = {(s.section, s.key): s.default for s in SETTINGS}
    values[("site", "name")] = site or default_site_name()
    return Config(values)


def render(config: Config) -> str:
    """The whole schema as a commented TOML file with `config`'s values."""
    lines = [
        "# tierfs configuration. Every setting is listed with its default.",
        f"format_version = {CONFIG_FORMAT_VERSION}",
    ]
    section = None
    for setting in SETTINGS:
        if setting.section != section:
            section = setting.section
            lines += ["", f"[{section}]"]
        value = config.get(setting.section, setting.key)
        default = setting.default_doc or _toml_value(setting.default)
        lines.append(f"# {setting.doc} Default: {default}")
        lines.append(f"{setting.key} = {_toml_value(value)}")
    lines += [
        "",
        "# Snapshot schedules, one [schedule.NAME] table each: paths (absolute, in the",
        '# filesystem; ["/"] is everything; a schedule without paths does not run), every',
        '# (seconds) or at ("HH:MM", daily, local time), keep_last (snapshots kept locally).',
        "# A table replaces the default of the same name.",
    ]
    for schedule in config.schedules:
        lines += ["", *schedule.to_toml()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return repr(value)


def write(data_dir: Path, config: Config) -> None:
    path = data_dir / CONFIG_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(config))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def load(data_dir: Path) -> Config:
    """Read and validate `tierfs.toml`; raise `TierfsError(CONFIG)` naming the bad key."""
    path = data_dir / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TierfsError(
            f"{path}: missing (not a tierfs data directory?)", ExitCode.CONFIG
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TierfsError(f"{path}: not valid TOML: {exc}", ExitCode.CONFIG) from None
    return parse(raw, str(path))


def parse(raw: dict[str, Any], where: str) -> Config:
    version = raw.pop("format_version", CONFIG_FORMAT_VERSION)
    if version != CONFIG_FORMAT_VERSION:
        raise TierfsError(
            f"{where}: format_version {version} is not supported (this tierfs reads "
            f"{CONFIG_FORMAT_VERSION}); "
            + (
                "install a newer tierfs"
                if isinstance(version, int) and version > CONFIG_FORMAT_VERSION
                else "rewrite it with 'tierfs mkfs' settings"
            ),
            ExitCode.VERSION,
        )
    config = defaults()
    values = dict(config.values)
    known = {(s.section, s.key): s for s in SETTINGS}
    schedules = raw.pop("schedule", {})
    if not isinstance(schedules, dict):
        raise TierfsError(f"{where}: 'schedule' must be [schedule.NAME] tables", ExitCode.CONFIG)
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise TierfsError(f"{where}: '{section}' must be a [section]", ExitCode.CONFIG)
        for key, value in table.items():
            setting = known.get((section, key))
            if setting is None:
                raise TierfsError(f"{where}: unknown setting {section}.{key}", ExitCode.CONFIG)
            values[(section, key)] = _validate(setting, value, where)
    config = Config(values, parse_schedules(schedules, where))
    _check_regional(config, where)
    _check_cold(config, where)
    if config.get("evict", "low_pct") > config.get("evict", "high_pct"):
        raise TierfsError(f"{where}: evict.low_pct is above evict.high_pct", ExitCode.CONFIG)
    return config


def _check_cold(config: Config, where: str) -> None:
    from tierfs.tiers.cold import devspec  # the zone backends are not needed to read a config

    try:
        devspec.parse(config.get("cold", "device"))
    except TierfsError as exc:
        raise TierfsError(f"{where}: cold.device: {exc.message}", ExitCode.CONFIG) from None
    if config.get("cold", "hot_low_pct") > config.get("cold", "hot_high_pct"):
        raise TierfsError(f"{where}: cold.hot_low_pct is above cold.hot_high_pct", ExitCode.CONFIG)


def _check_regional(config: Config, where: str) -> None:
    """The `[regional]` rules that span keys (keys set together, keys or a profile)."""
    try:
        StoreSettings.from_config(config)
    except TierfsError as exc:
        raise TierfsError(f"{where}: {exc.message}", ExitCode.CONFIG) from None


def _validate(setting: Setting, value: Any, where: str) -> Any:
    name = f"{setting.section}.{setting.key}"
    if setting.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, setting.type) or (setting.type is int and isinstance(value, bool)):
        raise TierfsError(
            f"{where}: {name} must be a {setting.type.__name__}, not {value!r}", ExitCode.CONFIG
        )
    if setting.minimum is not None and value < setting.minimum:
        raise TierfsError(f"{where}: {name} must be >= {setting.minimum}", ExitCode.CONFIG)
    if name == "log.level" and value not in _LOG_LEVELS:
        raise TierfsError(f"{where}: log.level must be one of {_LOG_LEVELS}", ExitCode.CONFIG)
    if name == "mount.atime" and value not in _ATIME_POLICIES:
        raise TierfsError(f"{where}: mount.atime must be one of {_ATIME_POLICIES}", ExitCode.CONFIG)
    if name == "regional.checksum_mode" and value not in CHECKSUM_MODES:
        raise TierfsError(f"{where}: {name} must be one of {CHECKSUM_MODES}", ExitCode.CONFIG)
    if name == "regional.max_object_mb" and value > S3_SINGLE_PUT_LIMIT_MB:
        raise TierfsError(f"{where}: {name} must be <= {S3_SINGLE_PUT_LIMIT_MB}", ExitCode.CONFIG)
    if name == "regional.url" and value and not value.startswith(("file:///", "s3://")):
        raise TierfsError(
            f"{where}: {name} must be file:///absolute/path or s3://bucket/prefix",
            ExitCode.CONFIG,
        )
    if name == "snapshots.dir_name" and (
        not 0 < len(value.encode()) <= 255 or "/" in value or "\0" in value or value in (".", "..")
    ):
        raise TierfsError(f"{where}: {name} must be a file name (no /)", ExitCode.CONFIG)
    if name == "site.name" and (not value or "/" in value):
        raise TierfsError(f"{where}: site.name must be a non-empty name", ExitCode.CONFIG)
    return value

"""`tierfs mkfs`: create a data directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from tierfs import config
from tierfs.cli.key import domain_for_mkfs, passphrase_file_option
from tierfs.data import domain as domain_mod
from tierfs.datadir import DataDir, is_locked
from tierfs.errors import ExitCode, TierfsError
from tierfs.meta import schema
from tierfs.meta.store import MetaStore
from tierfs.snap import keys
from tierfs.tiers.cold import devspec
from tierfs.upstream.objectstore import StoreSettings, open_store


@click.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--site", help="Site name (default: the host name).")
@click.option(
    "--domain",
    "domain_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Join the dedup domain of this bundle ('tierfs key export --domain-only') or domain "
    "file (then with --domain-key) from another site.",
)
@click.option(
    "--domain-key",
    "domain_key_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --domain DOMAIN_FILE: the domain signing key (keys/domain.key of a site of it).",
)
@passphrase_file_option
@click.option(
    "--zone-device",
    default="emulated:auto",
    show_default=True,
    help="The cold tier's zoned device: emulated:SIZE (e.g. 64G; auto: a quarter of the free "
    "space), zonefs:DIR, block:/dev/..., or none.",
)
@click.option(
    "--regional",
    default="",
    help="The regional store snapshots are sent to: file:///PATH or s3://BUCKET/PREFIX "
    "(endpoint and credentials: the [regional] section of tierfs.toml, or the AWS "
    "environment).",
)
@click.option("--force", is_flag=True, help="Replace an existing filesystem (its data is lost).")
def mkfs(
    data_dir: Path,
    site: str | None,
    domain_file: Path | None,
    domain_key_file: Path | None,
    passphrase_file: Path | None,
    zone_device: str,
    regional: str,
    force: bool,
) -> None:
    """Create a tierfs filesystem in DATA_DIR.

    Writes tierfs.toml (every setting, commented, with its default), the dedup domain file
    (a new domain, unless --domain names an existing one so that sites deduplicate against
    each other), the keys (a new site key, certified by the domain signing key) and an empty
    metadata index. Refuses to touch an existing filesystem unless --force is given.

    \b
    Examples:
      tierfs mkfs /var/lib/tierfs --site store-042
      tierfs mkfs /var/lib/tierfs --site store-043 --domain /root/acme-domain.bundle
      tierfs mkfs /var/lib/tierfs --site store-044 --domain acme.json --domain-key acme.key
      tierfs mkfs /var/lib/tierfs --site store-045 --zone-device zonefs:/mnt/zonefs
      tierfs mkfs /var/lib/tierfs --site store-046 --regional s3://acme-region/sites
    """
    dd = DataDir(data_dir.absolute())
    if site is not None:
        config.parse({"site": {"name": site}}, "--site")
    zones = devspec.plan(devspec.parse("" if zone_device == "none" else zone_device), dd.root)
    config.parse({"regional": {"url": regional}}, "--regional")
    joined = domain_for_mkfs(domain_file, domain_key_file, passphrase_file)
    domain, domain_keys = joined if joined else (None, None)
    if dd.is_filesystem():
        if not force:
            raise TierfsError(
                f"{dd.root}: already holds a tierfs filesystem (use --force to replace it)",
                ExitCode.ALREADY_EXISTS,
            )
        if is_locked(dd):
            raise TierfsError(f"{dd.root}: filesystem is mounted; unmount it first", ExitCode.BUSY)
        for sub in (dd.meta, dd.staging, dd.hot, dd.run, dd.cold):
            shutil.rmtree(sub, ignore_errors=True)
    elif dd.root.exists() and not dd.root.is_dir():
        raise TierfsError(f"{dd.root}: exists and is not a directory", ExitCode.NOT_A_FILESYSTEM)
    cfg = config.defaults(site)
    domain = domain or domain_mod.generate(cfg.site)
    domain_keys = domain_keys or keys.generate_domain_keys(domain.domain_id)
    try:
        dd.root.mkdir(parents=True, exist_ok=True)
        dd.make_layout()
        domain_mod.write(dd.domain, domain)
        store = MetaStore.create(dd.meta, cfg.site)
        with store.op() as tx:
            tx.put(schema.K_DOMAIN_ID, domain.domain_id.encode(), db=store.meta)
        info = store.info()
        store.close()
        keys.write_domain_keys(dd.root, domain_keys)
        site_keys = keys.create_site_keys(dd.root, cfg.site, info["uuid"], domain_keys)
        devspec.create(zones, dd.cold)
        cfg = config.parse(
            {
                "site": {"name": cfg.site},
                "cold": {"device": zones.recorded},
                "regional": {"url": regional},
            },
            "mkfs",
        )
        if regional.startswith("file://"):
            open_store(regional, StoreSettings.from_config(cfg), create=True).close()
        config.write(dd.root, cfg)
        _sync_dirs(dd)
    except OSError as exc:
        raise TierfsError(
            f"{dd.root}: cannot create filesystem: {exc.strerror}", ExitCode.IO
        ) from None
    click.echo(
        f"created tierfs filesystem {info['uuid']} for site {cfg.site!r} in {dd.root} "
        f"(dedup domain {domain.name!r} {domain.domain_id})"
    )
    click.echo(
        f"site key {site_keys.fingerprint} certified by domain key {domain_keys.fingerprint}; "
        f"keep a recovery bundle off-site: tierfs key export {dd.root} FILE"
    )


def _sync_dirs(dd: DataDir) -> None:
    """Make the new directory entries durable, so a power cut after mkfs loses nothing."""
    keys_dir = keys.keys_dir(dd.root)
    dirs = [dd.meta, dd.staging, dd.hot, dd.run, dd.log_dir, keys_dir, dd.root, dd.root.parent]
    for d in [dd.cold, *dirs] if dd.cold.exists() else dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

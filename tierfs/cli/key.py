"""`tierfs key`: site and domain keys, site certificates and recovery bundles."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tierfs.data import domain as domain_mod
from tierfs.datadir import DataDir, is_locked, resolve, tierfs_mounts
from tierfs.errors import ExitCode, TierfsError
from tierfs.snap import keys

F = TypeVar("F", bound=Callable[..., Any])


def passphrase_file_option(func: F) -> F:
    """`--passphrase-file FILE`, shared by `key export`, `key import` and `mkfs`."""
    option = click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Read the bundle passphrase from the first line of FILE (default: ask on a terminal).",
    )
    return option(func)


def read_passphrase_file(path: Path) -> str:
    """The first line of `path`, without its line end: files made with `echo` work."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise TierfsError(
            f"{path}: cannot read the passphrase file ({exc.strerror})", ExitCode.USAGE
        ) from None
    line = text.split("\n", 1)[0].rstrip("\r")
    if not line:
        raise TierfsError(f"{path}: the passphrase file's first line is empty", ExitCode.USAGE)
    return line


def passphrase_for_reading(passphrase_file: Path | None, bundle: Path) -> Callable[[], str]:
    """The passphrase of `bundle`, asked for only if the bundle turns out to be encrypted."""

    def get() -> str:
        if passphrase_file is not None:
            return read_passphrase_file(passphrase_file)
        if sys.stdin.isatty():
            return str(click.prompt("Bundle passphrase", hide_input=True))
        raise TierfsError(
            f"{bundle}: the bundle is encrypted: give --passphrase-file FILE (or run on a "
            "terminal to be asked)",
            ExitCode.USAGE,
        )

    return get


def passphrase_for_writing(passphrase_file: Path | None, no_passphrase: bool) -> str | None:
    """A new bundle is encrypted unless the operator says otherwise with --no-passphrase."""
    if no_passphrase and passphrase_file is not None:
        raise TierfsError(
            "--passphrase-file and --no-passphrase exclude each other", ExitCode.USAGE
        )
    if no_passphrase:
        return None
    if passphrase_file is not None:
        return read_passphrase_file(passphrase_file)
    if sys.stdin.isatty():
        return str(click.prompt("New bundle passphrase", hide_input=True, confirmation_prompt=True))
    raise TierfsError(
        "give --passphrase-file FILE to encrypt the bundle, or --no-passphrase to write it "
        "unencrypted (mode 0600)",
        ExitCode.USAGE,
    )


def domain_for_mkfs(
    domain_file: Path | None, domain_key_file: Path | None, passphrase_file: Path | None
) -> tuple[domain_mod.Domain, keys.DomainKeys] | None:
    """The domain and its signing key for `mkfs --domain FILE`; None for a new domain.

    FILE is either a bundle (`tierfs key export --domain-only`, which carries both) or a
    domain file, which then needs `--domain-key` (DATA_DIR/keys/domain.key of a site of the
    domain): a site cannot be certified without the domain's signing key.
    """
    if domain_file is None:
        if domain_key_file is not None or passphrase_file is not None:
            raise TierfsError("--domain-key and --passphrase-file need --domain", ExitCode.USAGE)
        return None
    if keys.is_bundle(domain_file):
        if domain_key_file is not None:
            raise TierfsError(
                f"{domain_file}: a bundle already holds the domain key; drop --domain-key",
                ExitCode.USAGE,
            )
        bundle = keys.read_bundle(domain_file, passphrase_for_reading(passphrase_file, domain_file))
        return bundle.domain, bundle.domain_keys
    domain = domain_mod.load(domain_file)
    if domain_key_file is None:
        raise TierfsError(
            f"{domain_file}: a domain file needs its signing key: add --domain-key "
            "DATA_DIR/keys/domain.key of a site of the domain, or pass a bundle made by "
            "'tierfs key export --domain-only' instead",
            ExitCode.USAGE,
        )
    domain_keys = keys.load_domain_key_file(domain_key_file)
    keys.check_domain_key(domain, domain_keys, str(domain_key_file))
    return domain, domain_keys


@click.group()
def key() -> None:
    """Site and domain keys, site certificates and recovery bundles.

    Every site signs its snapshot manifests with its site key (DATA_DIR/keys/site.key); the
    domain's signing key (DATA_DIR/keys/domain.key) certifies each site, so that a restore
    on a new machine can check that a manifest came from the domain. Keep a recovery bundle
    of each site off-site: without it, a lost site's backups cannot be verified.

    \b
    Examples:
      tierfs key show /srv/data
      tierfs key export /srv/data /root/store-042.bundle
      tierfs key import /root/store-042.bundle /var/lib/tierfs
    """


@key.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@passphrase_file_option
@click.option("--no-passphrase", is_flag=True, help="Write the bundle unencrypted (mode 0600).")
@click.option(
    "--domain-only",
    is_flag=True,
    help="Leave this site's key out: a bundle for 'mkfs --domain' of another site.",
)
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def export(
    path: Path,
    file: Path,
    passphrase_file: Path | None,
    no_passphrase: bool,
    domain_only: bool,
    force: bool,
) -> None:
    """Write the recovery bundle of the filesystem at PATH to FILE.

    PATH is the mount point or the data directory. The bundle holds the domain file, the
    domain signing key, the site key and the site certificate, encrypted with a passphrase
    (scrypt + AES-256-GCM) unless --no-passphrase is given. Keep it off-site: it is what
    `tierfs key import` and a restore on a new machine need.

    \b
    Examples:
      tierfs key export /srv/data /root/store-042.bundle
      tierfs key export --passphrase-file /root/pw /var/lib/tierfs /mnt/usb/store-042.bundle
      tierfs key export --domain-only --no-passphrase /srv/data /root/acme-domain.bundle
    """
    dd = resolve(path)
    passphrase = passphrase_for_writing(passphrase_file, no_passphrase)
    try:
        bundle = keys.export_bundle(dd.root, file, passphrase, domain_only=domain_only, force=force)
    except OSError as exc:
        raise TierfsError(
            f"{file}: cannot write the bundle ({exc.strerror})", ExitCode.IO
        ) from None
    what = "encrypted bundle" if passphrase else "unencrypted bundle"
    site = bundle.site
    holds = f"site {site.site_name!r} key {site.fingerprint}" if site else "no site key"
    click.echo(
        f"wrote {what} {file}: domain {bundle.domain.name!r} {bundle.domain.domain_id}, "
        f"{holds}; keep it off-site"
    )


@key.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("data_dir", type=click.Path(path_type=Path, file_okay=False))
@passphrase_file_option
@click.option("--force", is_flag=True, help="Replace different keys already in DATA_DIR.")
def import_(file: Path, data_dir: Path, passphrase_file: Path | None, force: bool) -> None:
    """Install the domain file and keys of the bundle FILE into DATA_DIR.

    DATA_DIR is a data directory (not a mount point); it is created if missing, so a site
    can be rebuilt on a new machine. Files that already hold the same keys are kept;
    different ones are replaced only with --force, and a filesystem's domain file never by
    another domain's. Refused while the filesystem is mounted.

    \b
    Examples:
      tierfs key import /root/store-042.bundle /var/lib/tierfs
      tierfs key import --passphrase-file /root/pw /mnt/usb/store-042.bundle /var/lib/tierfs
    """
    root = data_dir.absolute()
    if root in tierfs_mounts():
        raise TierfsError(
            f"{root}: is a tierfs mount point; give the data directory", ExitCode.USAGE
        )
    dd = DataDir(root)
    if is_locked(dd):
        raise TierfsError(f"{root}: filesystem is mounted; unmount it first", ExitCode.BUSY)
    try:
        bundle = keys.import_bundle(
            file, root, passphrase_for_reading(passphrase_file, file), force=force
        )
    except OSError as exc:
        raise TierfsError(f"{root}: cannot write the keys ({exc.strerror})", ExitCode.IO) from None
    site = bundle.site
    what = f"site {site.site_name!r} (epoch {site.epoch})" if site else "the domain key"
    click.echo(
        f"imported domain {bundle.domain.name!r} {bundle.domain.domain_id} and {what} into {root}"
    )


@key.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document.")
def show(path: Path, as_json: bool) -> None:
    """Show the keys of the filesystem at PATH: public keys, fingerprints, certificate.

    PATH is the mount point or the data directory. The site certificate is checked against
    the domain's signing key; when it does not verify, the keys are still shown and the
    command exits with code 12.

    \b
    Examples:
      tierfs key show /srv/data
      tierfs key show /var/lib/tierfs --json | jq .certificate
    """
    dd = resolve(path)
    doc = describe(dd.root)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(render(doc))
    error = doc["certificate"]["error"]
    if error is not None:
        raise keys.VerificationError(error)


def describe(data_dir: Path) -> dict[str, Any]:
    """The `key show --json` document (schema_version 1.0; no private key ever appears)."""
    domain = domain_mod.load(data_dir / domain_mod.DOMAIN_FILE)
    site = keys.load_site_keys(data_dir)
    domain_keys = keys.load_domain_keys(data_dir) if keys.has_domain_keys(data_dir) else None
    cert = site.certificate
    verified: bool | None = None
    error: str | None = None
    if domain_keys is not None:
        try:
            keys.check_domain_key(domain, domain_keys, "keys/domain.key")
            keys.verify_certificate(cert, domain_keys.public_key, domain_id=domain.domain_id)
            verified = True
        except TierfsError as exc:
            verified, error = False, exc.message
    return {
        "schema_version": "1.0",
        "data_dir": str(data_dir),
        "domain": {
            "id": domain.domain_id,
            "name": domain.name,
            "signing_key": None
            if domain_keys is None
            else {
                "public_key": domain_keys.public_key.hex(),
                "fingerprint": domain_keys.fingerprint,
                "created": domain_keys.created,
            },
        },
        "site": {
            "name": site.site_name,
            "uuid": site.site_uuid,
            "public_key": site.public_key.hex(),
            "fingerprint": site.fingerprint,
            "created": site.created,
        },
        "certificate": {
            "domain_id": cert.domain_id,
            "domain_key_fingerprint": keys.fingerprint(cert.domain_public_key),
            "epoch": cert.epoch,
            "issued": cert.issued,
            "valid_until": cert.valid_until,
            "verified": verified,
            "error": error,
        },
    }


def render(doc: dict[str, Any]) -> str:
    """The table form of `describe`."""
    domain, site, cert = doc["domain"], doc["site"], doc["certificate"]
    signing = domain["signing_key"]
    if cert["verified"] is None:
        check = "not checked (no domain signing key in keys/domain.key)"
    else:
        check = "verified" if cert["verified"] else f"FAILED: {cert['error']}"
    rows = [
        ("domain", f"{domain['name']} {domain['id']}"),
        (
            "domain key",
            f"{signing['fingerprint']} (created {signing['created']})" if signing else "missing",
        ),
        ("site", f"{site['name']} {site['uuid']}"),
        ("site key", f"{site['fingerprint']} (created {site['created']})"),
        (
            "certificate",
            f"epoch {cert['epoch']}, issued {cert['issued']}, valid until "
            f"{cert['valid_until'] or 'no expiry'}",
        ),
        ("issued by", f"{cert['domain_key_fingerprint']}: {check}"),
    ]
    return "\n".join(f"{name:<12} {value}" for name, value in rows)

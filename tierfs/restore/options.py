"""The SOURCE options shared by the `tierfs restore` commands, and opening a source from them.

Credentials are never options (a command line is visible to every user of the machine): S3
keys come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or instance metadata.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tierfs.cli.key import passphrase_for_reading
from tierfs.restore.source import Source, open_source

F = TypeVar("F", bound=Callable[..., Any])


def source_options(func: F) -> F:
    """--key-file, --passphrase-file, --endpoint, --region, --profile."""
    options = [
        click.option(
            "--key-file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Recovery bundle (tierfs key export; --domain-only is enough) whose domain "
            "key verifies the store's manifests. Needed for a store URL.",
        ),
        click.option(
            "--passphrase-file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Read the bundle passphrase from the first line of FILE (default: ask on a "
            "terminal).",
        ),
        click.option("--endpoint", help="S3 endpoint URL (default: AWS)."),
        click.option("--region", "s3_region", help="S3 region."),
        click.option("--profile", help="AWS profile for the credentials."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def open_from_options(
    source: str,
    key_file: Path | None,
    passphrase_file: Path | None,
    endpoint: str | None,
    s3_region: str | None,
    profile: str | None,
    workers: int = 8,
) -> Source:
    """`open_source` with the passphrase asked only if the bundle turns out encrypted."""
    passphrase = (
        functools.cache(passphrase_for_reading(passphrase_file, key_file)) if key_file else None
    )
    return open_source(
        source,
        key_file=key_file,
        passphrase=passphrase,
        endpoint=endpoint,
        region=s3_region,
        profile=profile,
        workers=workers,
    )

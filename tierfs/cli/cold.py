"""`tierfs migrate` and `tierfs zones`: the cold tier by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tierfs import control
from tierfs.datadir import resolve


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--now", is_flag=True, help="Migrate every sealed chunk, however recently used.")
@click.option("--timeout", default=86400.0, show_default=True, help="Seconds to wait.")
def migrate(path: Path, now: bool, timeout: float) -> None:
    """Move cold chunks of the mounted filesystem at PATH into the zones of its cold tier.

    Without --now, runs the migration policy at once (chunks of hot segments not used for
    cold.cold_after). With --now, seals all staged data first and then migrates every chunk
    that still has a hot copy. Reads stay transparent either way.

    \b
    Examples:
      tierfs migrate /srv/data
      tierfs migrate /srv/data --now
    """
    dd = resolve(path)
    answer = control.request(dd.control_socket, "migrate", timeout=timeout, now=now)
    click.echo(
        f"migrated {answer.get('migrated_chunks', 0):,} chunks"
        + (f" ({answer['migrated_bytes']:,} bytes)" if "migrated_bytes" in answer else "")
    )


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--reclaim",
    is_flag=True,
    help="First reclaim now: reset empty zones, relocate the live records of dirty ones.",
)
def zones(path: Path, as_json: bool, reclaim: bool) -> None:
    """Report every zone of the cold tier of the mounted filesystem at PATH.

    Condition, write pointer, capacity, live bytes (what committed chunk locations point at)
    and lifetime class of each sequential zone.

    \b
    Examples:
      tierfs zones /srv/data
      tierfs zones /srv/data --json | jq '.[] | select(.live_bytes > 0)'
      tierfs zones /srv/data --reclaim
    """
    dd = resolve(path)
    if reclaim:
        done = control.request(dd.control_socket, "reclaim", timeout=3600.0)
        click.echo(f"reclaim: {done['zones_reset']} zones reset", err=True)
    report: list[dict[str, Any]] = control.request(dd.control_socket, "zones")["zones"]
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"{'zone':>6}  {'condition':<10} {'written':>12} {'capacity':>12} {'live':>12}  class"
    )
    for z in report:
        written = "-" if z["write_pointer"] is None else f"{z['write_pointer']:,}"
        click.echo(
            f"{z['zone']:>6}  {z['condition']:<10} {written:>12} {z['capacity']:>12,} "
            f"{z['live_bytes']:>12,}  {z['class']}"
        )

"""Helpers for trio tasks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

Emit = Callable[[T], Awaitable[None]]


async def pipeline(
    produce: Callable[[Emit[T]], Awaitable[None]], consume: Callable[[T], Awaitable[None]]
) -> None:
    """Run `produce(emit)` and `consume(item)` for each item it emits, so that the next item
    is made while the one before is consumed (one item handed over at a time: at most two
    are alive).

    Errors come out as they are, not in the exception group a nursery would raise (callers
    catch `ColdFull` or `TierfsError`): when the producer fails, the items it emitted are
    consumed and its error is raised; when the consumer fails, the producer is cancelled and
    the consumer's error is raised.
    """
    send, receive = trio.open_memory_channel[T](0)
    failed: list[Exception] = []

    async def producer() -> None:
        async with send:
            try:
                await produce(send.send)
            except Exception as exc:
                failed.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        async with receive:
            async for item in receive:
                try:
                    await consume(item)
                except Exception as exc:
                    failed.append(exc)
                    nursery.cancel_scope.cancel()
                    break
    if failed:
        raise failed[0]

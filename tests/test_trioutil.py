"""`tierfs.trioutil.pipeline`: overlap, order, and errors that come out unwrapped."""

from __future__ import annotations

import pytest
import trio

from tierfs.trioutil import Emit, pipeline


def test_items_are_consumed_in_order_while_the_next_is_made() -> None:
    events: list[str] = []

    async def produce(emit: Emit[int]) -> None:
        for i in range(4):
            events.append(f"made {i}")
            await emit(i)

    async def consume(item: int) -> None:
        await trio.sleep(0.01)
        events.append(f"used {item}")

    trio.run(pipeline, produce, consume)
    assert [e for e in events if e.startswith("used")] == [f"used {i}" for i in range(4)]
    # The next item is made before the one handed over is used up, never two ahead.
    assert events.index("made 1") < events.index("used 0")
    assert events.index("made 3") > events.index("used 1")


def test_a_producer_error_comes_out_unwrapped_after_what_it_made_is_used() -> None:
    used: list[int] = []

    async def produce(emit: Emit[int]) -> None:
        await emit(1)
        await emit(2)
        raise KeyError("broken source")

    async def consume(item: int) -> None:
        await trio.sleep(0.01)
        used.append(item)

    with pytest.raises(KeyError, match="broken source"):
        trio.run(pipeline, produce, consume)
    assert used == [1, 2]


def test_a_consumer_error_comes_out_unwrapped_and_stops_the_producer() -> None:
    made: list[int] = []

    async def produce(emit: Emit[int]) -> None:
        for i in range(100):
            made.append(i)
            await emit(i)

    async def consume(item: int) -> None:
        if item == 2:
            raise OSError(28, "no space left")

    with pytest.raises(OSError, match="no space left"):
        trio.run(pipeline, produce, consume)
    assert made[-1] <= 3

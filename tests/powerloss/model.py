"""What each test file may hold after a crash, and the check of a remounted filesystem.

Each test file writes its bytes sequentially from offset 0. Truncating it to zero starts a new
*generation*. Every byte comes from a pattern that names the file, the generation and the
offset, so no two files (or generations) ever hold the same bytes, and a file holding another
file's bytes is caught and named.

After a crash a file may be absent or present under any name in its `locations`: the names it
had since its directory was last fsynced (None: not there). If present it must hold a state it
really had: a prefix of one generation's bytes, where zeros may replace the tail (the size was
recorded before the data was durable), never longer than what was written. The generation of
the last completed fsync is a floor: no older generation may come back, and that generation's
fsynced bytes must be there in full. A file whose `locations` do not include None must be
present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PATTERN_BLOCK = 32


def pattern(key: str, generation: int, offset: int, size: int) -> bytes:
    """Bytes [offset, offset + size) of a file's generation: readable, unique, never zero."""
    if size <= 0:
        return b""
    first, last = offset // PATTERN_BLOCK, (offset + size - 1) // PATTERN_BLOCK
    blocks = b"".join(
        f"<{key}/{generation}@{i:x}>".encode().ljust(PATTERN_BLOCK - 1, b".")[: PATTERN_BLOCK - 1]
        + b"\n"
        for i in range(first, last + 1)
    )
    start = offset - first * PATTERN_BLOCK
    return blocks[start : start + size]


def common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix (bisection over C-speed slice compares)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def describe(content: bytes) -> str:
    """Length, zeros, and the first pattern tag: which file and generation the bytes are of."""
    zeros = content.count(0)
    if zeros == len(content):
        return f"{len(content)} bytes, all zero"
    start = len(content) - len(content.lstrip(b"\0"))
    head = content[start : start + PATTERN_BLOCK].decode(errors="replace").strip()
    where = "" if start == 0 else f" after {start} zero bytes"
    return f"{len(content)} bytes ({zeros} zero), {head!r}{where}"


@dataclass
class Generation:
    """The bytes written since the file was created or last truncated to zero.

    `number` picks the byte pattern; it is never reused within a file.
    """

    number: int
    data: bytearray = field(default_factory=bytearray)
    durable: int = 0  # bytes a completed fsync made durable

    def accepts(self, content: bytes, floor: int) -> bool:
        if not floor <= len(content) <= len(self.data):
            return False
        k = common_prefix(content, bytes(self.data))
        return k >= floor and content[k:] == bytes(len(content) - k)


@dataclass
class FileModel:
    """One test file: its generations, where it may be, and its open handle in the test."""

    key: str
    name: str | None
    locations: set[str | None]
    generations: list[Generation] = field(default_factory=lambda: [Generation(0)])
    durable_generation: int = 0  # index in `generations` of the last fsynced one
    ino: int | None = None
    fd: int | None = None
    uncertain: bool = False  # since a crash, until observed: the workload leaves it alone

    @property
    def current(self) -> Generation:
        return self.generations[-1]

    def new_generation(self, data: bytes = b"", durable: int = 0) -> Generation:
        gen = Generation(self.current.number + 1, bytearray(data), durable)
        self.generations.append(gen)
        return gen

    def accepts(self, content: bytes) -> bool:
        """Whether the file may hold `content` after a crash."""
        floor_gen = self.durable_generation
        return any(
            gen.accepts(content, gen.durable if i == floor_gen else 0)
            for i, gen in enumerate(self.generations)
            if i >= floor_gen
        )

    def must_exist(self) -> bool:
        return None not in self.locations

    def is_certain(self) -> bool:
        """Whether a crash now keeps exactly the name and bytes the file has."""
        return (
            self.locations == {self.name}
            and self.durable_generation == len(self.generations) - 1
            and self.current.durable == len(self.current.data)
        )

    def describe(self) -> str:
        gens = ", ".join(
            f"#{g.number}: {len(g.data)} written, {g.durable} fsynced" for g in self.generations
        )
        where = sorted(str(n) for n in self.locations)
        floor = self.generations[self.durable_generation].number
        return (
            f"file {self.key} (inode {self.ino}; may be at {where}; generations {gens}; "
            f"oldest allowed #{floor})"
        )


@dataclass
class Observed:
    """The remounted directory: each regular file's bytes and inode number."""

    contents: dict[str, bytes]
    inos: dict[str, int]


def observe(directory: Path) -> Observed:
    contents: dict[str, bytes] = {}
    inos: dict[str, int] = {}
    for entry in os.scandir(directory):
        inos[entry.name] = entry.inode()
        with open(entry.path, "rb") as f:
            contents[entry.name] = f.read()
    return Observed(contents, inos)


class Model:
    """Every test file of one filesystem, across crashes."""

    def __init__(self) -> None:
        self.files: list[FileModel] = []
        self._serial = 0

    def new_file(self, prefix: str) -> FileModel:
        self._serial += 1
        key = f"{prefix}{self._serial}"
        f = FileModel(key=key, name=key, locations={None, key})
        self.files.append(f)
        return f

    def fresh_name(self, f: FileModel) -> str:
        self._serial += 1
        return f"{f.key}.{self._serial}"

    def present(self) -> list[FileModel]:
        return [f for f in self.files if f.name is not None]

    def directory_synced(self) -> None:
        """An fsync of the directory completed: every file's current name is durable (a file
        left uncertain by a crash keeps all its possible names: whichever it has is durable)."""
        for f in self.files:
            if not f.uncertain:
                f.locations = {f.name}

    def all_durable(self) -> None:
        """A clean unmount completed: everything is durable as it is now."""
        self.directory_synced()
        for f in self.files:
            f.current.durable = len(f.current.data)
            f.durable_generation = len(f.generations) - 1

    def crashed(self) -> None:
        """The filesystem crashed: files not certain to have survived as they were become
        uncertain until observed (`settle`)."""
        for f in self.files:
            if not f.is_certain():
                f.name, f.uncertain = None, True

    def problems(self, observed: Observed) -> list[str]:
        """Every way `observed` is not a state this model allows (empty: all fine)."""
        out: list[str] = []
        holders = self.assign(observed)
        for name, content in sorted(observed.contents.items()):
            candidates = [f for f in self.files if name in f.locations]
            if not candidates:
                out.append(f"{name}: unexpected file holding {describe(content)}")
            elif not any(f.accepts(content) for f in candidates):
                out.append(
                    f"{name}: holds {describe(content)}, a state no candidate ever had: "
                    + "; ".join(f.describe() for f in candidates)
                )
            elif name not in holders:
                out.append(
                    f"{name}: holds {describe(content)}, but every file that may hold it is "
                    "present under another name: " + "; ".join(f.describe() for f in candidates)
                )
        for f in self.files:
            if f.must_exist() and not any(n in observed.contents for n in f.locations):
                out.append(f"{f.key}: missing: {f.describe()}")
        return out

    def assign(self, observed: Observed) -> dict[str, FileModel]:
        """Which file each present name holds: no file at two names, no two files at one
        name, each file at a name among its `locations` whose bytes it accepts.

        Bytes alone do not always tell the files apart: an empty file, a tail of zeros, or the
        "<" every pattern starts with may be accepted by several files, so a file may accept
        the name another file is at. A first-fit choice could then give that name to the wrong
        file and leave the right one's name to no file, and a name no file holds falls out of
        the model (`settle`). A maximum matching (augmenting paths) gives a file to every name
        that any assignment can. Files that are certain come first, then those that may be at
        a name with their own inode number; each tries that name first, then its current one.
        """
        options: dict[int, list[str]] = {}
        for f in self.files:
            names = [
                n
                for n in f.locations
                if n is not None and n in observed.contents and f.accepts(observed.contents[n])
            ]
            options[id(f)] = sorted(
                names, key=lambda n: (observed.inos.get(n) != f.ino, n != f.name, n)
            )
        holders: dict[str, FileModel] = {}

        def place(f: FileModel, tried: set[str]) -> bool:
            for name in options[id(f)]:
                if name in tried:
                    continue
                tried.add(name)
                other = holders.get(name)
                if other is None or place(other, tried):
                    holders[name] = f
                    return True
            return False

        def order(f: FileModel) -> tuple[bool, bool]:
            own_ino = any(observed.inos.get(n) == f.ino for n in options[id(f)])
            return (f.name is None, not own_ino)

        for f in sorted((f for f in self.files if options[id(f)]), key=order):
            place(f, set())
        return holders

    def gone(self, observed: Observed) -> list[FileModel]:
        """Files absent after the crash whose inode number no present file has taken over."""
        taken = set(observed.inos.values())
        present = {id(f) for f in self.assign(observed).values()}
        return [
            f
            for f in self.files
            if f.ino is not None and f.ino not in taken and id(f) not in present
        ]

    def settle(self, observed: Observed) -> None:
        """After a checked remount the observed state is the new certain, durable state."""
        at = {id(f): name for name, f in self.assign(observed).items()}
        for f in self.files:
            name = at.get(id(f))
            if name is None:
                f.name, f.locations, f.uncertain = None, {None}, False
                continue
            content = observed.contents[name]
            f.name, f.locations, f.ino = name, {name}, observed.inos[name]
            f.uncertain = False
            # A fresh pattern from here on: bytes of the old generations may not come back.
            f.generations = [f.new_generation(content, len(content))]
            f.durable_generation = 0

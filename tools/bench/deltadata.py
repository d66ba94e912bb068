"""The delta benchmark's dataset and its standard edit, both made from a seed.

The dataset imitates what an edge site holds, by share of `size`:

- **logs** (LOG_SHARE): a few text files of timestamped lines, compressible;
- **documents** (DOC_SHARE): many small and medium files of prose and CSV, compressible;
- **a database** (DB_SHARE): one big file of 4 KiB pages, each with a header, rows, an
  incompressible blob and free space, so partly compressible; named `*.db`, as a database
  file usually is (tierfs cuts such names into fixed-size blocks, `seal.fixed_chunking_patterns`);
- **media** (the rest): a few big files of incompressible bytes.

The standard edit (`plan_edit`) then changes it as people and programs do: 100 bytes inserted
in the middle of several documents and logs (everything after them shifts), a few KiB
appended to every log, and 1 % of the database's 4 KiB pages rewritten in place (pwrite, the
file keeps its size). Its logical change is the bytes it inserted, appended or rewrote: the
yardstick for what a delta-sending backup should upload.

Every byte follows from the seed, so two runs (and the plain copy the benchmark checks the
mount against) hold the same files. Random bytes come from BLAKE3's output stream (fast, and
the same on every platform); choices from `random.Random` seeded with a string.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import os
import random
import string
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import blake3

KIB, MIB = 1 << 10, 1 << 20
PAGE = 4 * KIB
WRITE_BLOCK = 1 * MIB

LOG_SHARE, DOC_SHARE, DB_SHARE = 0.08, 0.12, 0.45  # media: the rest
LOG_NAMES = ("api", "worker", "auth", "billing", "scheduler", "gateway")
LOG_FILES = 4
MEDIA_FILES = 4
DOC_DIRS = 16
DOC_MIN, DOC_MAX = 2 * KIB, 512 * KIB
MIN_FILE = 4 * KIB

INSERT_BYTES = 100
INSERT_DOCUMENTS, INSERT_LOGS = 8, 2
APPEND_MIN, APPEND_MAX = 2 * KIB, 8 * KIB
REWRITE_SHARE = 0.01

LOG_EPOCH = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
EDIT_EPOCH = LOG_EPOCH + datetime.timedelta(days=30)

KINDS = ("log", "document", "database", "media")


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One file of the dataset: where (relative to the root), what kind, how big."""

    path: str
    kind: str
    size: int


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The files of a dataset, as planned from `size` and `seed` (nothing read from disk)."""

    size: int
    seed: int
    files: tuple[FileSpec, ...]

    def of_kind(self, kind: str) -> list[FileSpec]:
        return [f for f in self.files if f.kind == kind]

    def bytes_of(self, kind: str) -> int:
        return sum(f.size for f in self.of_kind(kind))


# -- random sources ---------------------------------------------------------------------------


class Noise:
    """Incompressible bytes read in order from a BLAKE3 output stream keyed by a label: one
    stream per file, so a file's bytes do not depend on the order files are made in."""

    def __init__(self, label: str) -> None:
        self._hasher = blake3.blake3(label.encode())
        self._offset = 0

    def read(self, size: int) -> bytes:
        data = self._hasher.digest(length=size, seek=self._offset)
        self._offset += size
        return data


def _rng(seed: int, *labels: object) -> random.Random:
    """A generator of its own for each purpose: adding a file does not change the others."""
    return random.Random("/".join(["tierfs-delta", str(seed), *map(str, labels)]))


def _words(rng: random.Random, count: int) -> list[str]:
    """Pronounceable pseudo-words, short ones more likely, as in a natural language."""
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    out = []
    for _ in range(count):
        length = min(2 + int(rng.expovariate(0.45)), 12)
        out.append("".join(rng.choice(vowels if i % 2 else consonants) for i in range(length)))
    return out


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Words (Zipf-weighted) and sentences made of them: text that compresses like prose."""

    words: list[str]
    cum_weights: list[float]
    sentences: list[str]

    @classmethod
    def make(cls, seed: int) -> Vocabulary:
        rng = _rng(seed, "vocabulary")
        words = _words(rng, 4000)
        cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
        vocabulary = cls(words, cum_weights, [])
        for _ in range(6000):
            sentence = " ".join(vocabulary.pick(rng, rng.randint(5, 18))).capitalize()
            vocabulary.sentences.append(sentence + rng.choice(".....?!;"))
        return vocabulary

    def pick(self, rng: random.Random, count: int) -> list[str]:
        """`count` words, frequent ones more often (cumulative weights: no O(n) per call)."""
        return rng.choices(self.words, cum_weights=self.cum_weights, k=count)

    def text(self, rng: random.Random, size: int) -> bytes:
        """About `size` bytes of paragraphs (cut to exactly `size`)."""
        parts, total = [], 0
        while total < size:
            paragraph = " ".join(rng.choices(self.sentences, k=rng.randint(2, 9))) + "\n\n"
            parts.append(paragraph)
            total += len(paragraph)
        return "".join(parts).encode()[:size]

    def line(self, rng: random.Random, size: int) -> bytes:
        """Exactly `size` bytes of text ending in a newline (an inserted line)."""
        text = " ".join(self.pick(rng, size)).capitalize()
        return (text[: size - 2] + ".\n").encode()


# -- the dataset plan -------------------------------------------------------------------------


def _split(total: int, count: int, rng: random.Random, step: int = 1) -> list[int]:
    """`total` bytes in `count` parts of uneven sizes (multiples of `step`), summing exactly."""
    count = max(1, min(count, total // max(MIN_FILE, step)))
    weights = [rng.uniform(0.5, 1.5) for _ in range(count)]
    units = total // step
    parts = [int(units * w / sum(weights)) for w in weights]
    parts[-1] += units - sum(parts)
    sizes = [p * step for p in parts]
    sizes[-1] += total - sum(sizes)
    return sizes


def _document_sizes(total: int, rng: random.Random) -> list[int]:
    """Log-uniform sizes between DOC_MIN and DOC_MAX (many small, some medium), summing to
    `total`; the last one takes what is left (merged into its predecessor when tiny)."""
    sizes: list[int] = []
    left = total
    while left > 0:
        size = min(int(math.exp(rng.uniform(math.log(DOC_MIN), math.log(DOC_MAX)))), left)
        if left - size < DOC_MIN and sizes:
            size = left
        sizes.append(size)
        left -= size
    return sizes


def plan(size: int, seed: int) -> Dataset:
    """Which files the dataset has and how big: exactly `size` bytes in all."""
    rng = _rng(seed, "plan")
    log_bytes = int(size * LOG_SHARE)
    doc_bytes = int(size * DOC_SHARE)
    db_bytes = max(PAGE, int(size * DB_SHARE) // PAGE * PAGE)
    media_bytes = size - log_bytes - doc_bytes - db_bytes
    files: list[FileSpec] = []
    for name, part in zip(LOG_NAMES, _split(log_bytes, LOG_FILES, rng), strict=False):
        files.append(FileSpec(f"logs/{name}.log", "log", part))
    for index, part in enumerate(_document_sizes(doc_bytes, rng)):
        suffix = "csv" if rng.random() < 0.25 else "md"
        files.append(
            FileSpec(f"docs/{index % DOC_DIRS:02d}/doc-{index:05d}.{suffix}", "document", part)
        )
    files.append(FileSpec("db/orders.db", "database", db_bytes))
    for index, part in enumerate(_split(media_bytes, MEDIA_FILES, rng)):
        files.append(FileSpec(f"media/clip-{index}.mp4", "media", part))
    return Dataset(size, seed, tuple(f for f in files if f.size > 0))


# -- file contents ----------------------------------------------------------------------------

LEVELS = ("INFO",) * 12 + ("DEBUG",) * 5 + ("WARN",) * 2 + ("ERROR",)


class LogWriter:
    """Log lines: an ISO timestamp that moves forward, host, service, pid, level, message."""

    def __init__(self, vocabulary: Vocabulary, rng: random.Random, service: str) -> None:
        self.vocabulary = vocabulary
        self.rng = rng
        self.service = service
        self.templates = [" ".join(vocabulary.pick(rng, rng.randint(3, 9))) for _ in range(150)]

    def lines(self, start: datetime.datetime) -> Iterator[str]:
        rng, now = self.rng, start
        while True:
            now += datetime.timedelta(microseconds=rng.randint(100, 400_000))
            yield (
                f"{now.isoformat(timespec='milliseconds')} edge-{rng.randint(1, 4)} "
                f"{self.service}[{rng.randint(1000, 1063)}]: {rng.choice(LEVELS)} "
                f"{rng.choice(self.templates)} id={rng.getrandbits(40):x} "
                f"took={rng.randint(0, 5000)}ms\n"
            )

    def text(self, size: int, start: datetime.datetime) -> bytes:
        """Whole lines, about `size` bytes, cut to exactly `size`."""
        parts, total = [], 0
        for line in self.lines(start):
            parts.append(line)
            total += len(line)
            if total >= size:
                break
        return "".join(parts).encode()[:size]

    def line(self, size: int, when: datetime.datetime) -> bytes:
        """Exactly `size` bytes: one line at `when`, padded or cut to fit."""
        head = next(self.lines(when - datetime.timedelta(microseconds=100)))
        return (head[:-1] + " " + "-" * size)[: size - 1].encode() + b"\n"


def log_blocks(vocabulary: Vocabulary, spec: FileSpec, seed: int) -> Iterator[bytes]:
    writer = LogWriter(vocabulary, _rng(seed, spec.path), Path(spec.path).stem)
    yield writer.text(spec.size, LOG_EPOCH)


def _csv(rng: random.Random, vocabulary: Vocabulary, size: int) -> bytes:
    rows, total = ["id,name,city,quantity,price,updated\n"], 0
    while total < size:
        name, city = vocabulary.pick(rng, 2)
        row = (
            f"{rng.randint(1, 10**7)},{name},{city.capitalize()},{rng.randint(1, 500)},"
            f"{rng.randint(1, 99999) / 100:.2f},2024-0{rng.randint(1, 5)}-{rng.randint(10, 28)}\n"
        )
        rows.append(row)
        total += len(row)
    return "".join(rows).encode()[:size]


def document_blocks(vocabulary: Vocabulary, spec: FileSpec, seed: int) -> Iterator[bytes]:
    rng = _rng(seed, spec.path)
    if spec.path.endswith(".csv"):
        yield _csv(rng, vocabulary, spec.size)
    else:
        yield vocabulary.text(rng, spec.size)


class Pages:
    """4 KiB pages of a database file: a header (page number, LSN, row count, checksum), rows
    of structured text, an incompressible blob (keys, hashes, packed numbers) and free space
    (zeros). About half of each page compresses."""

    HEADER = struct.Struct("<IQHHI")

    def __init__(self, vocabulary: Vocabulary, seed: int, label: str) -> None:
        rng = _rng(seed, label, "rows")
        self.rows = [
            (
                f"{rng.randint(1, 10**9):>10}|"
                + " ".join(vocabulary.pick(rng, rng.randint(2, 8)))
                + f"|{rng.choice(string.ascii_uppercase)}{rng.randint(0, 999):03d}|"
            ).encode()
            for _ in range(2048)
        ]

    def page(self, number: int, lsn: int, rng: random.Random, noise: Noise) -> bytes:
        blob = noise.read(rng.randint(1024, 2048))
        room = PAGE - self.HEADER.size - len(blob) - rng.randint(256, 1024)
        rows: list[bytes] = []
        used = 0
        while True:
            row = rng.choice(self.rows)
            if used + len(row) > room:
                break
            rows.append(row)
            used += len(row)
        body = b"".join(rows) + blob
        checksum = int.from_bytes(blake3.blake3(body).digest(length=4), "little")
        header = self.HEADER.pack(number, lsn, len(rows), 0, checksum)
        return (header + body).ljust(PAGE, b"\0")


def database_blocks(vocabulary: Vocabulary, spec: FileSpec, seed: int) -> Iterator[bytes]:
    pages = Pages(vocabulary, seed, spec.path)
    rng, noise = _rng(seed, spec.path, "pages"), Noise(f"{seed}/{spec.path}/pages")
    batch = WRITE_BLOCK // PAGE
    for first in range(0, spec.size // PAGE, batch):
        last = min(first + batch, spec.size // PAGE)
        yield b"".join(pages.page(n, 1000 + n, rng, noise) for n in range(first, last))


def media_blocks(spec: FileSpec, seed: int) -> Iterator[bytes]:
    noise = Noise(f"{seed}/{spec.path}/media")
    for offset in range(0, spec.size, WRITE_BLOCK):
        yield noise.read(min(WRITE_BLOCK, spec.size - offset))


def blocks(vocabulary: Vocabulary, spec: FileSpec, seed: int) -> Iterator[bytes]:
    """The contents of one file, in pieces to write one after the other."""
    if spec.kind == "log":
        return log_blocks(vocabulary, spec, seed)
    if spec.kind == "document":
        return document_blocks(vocabulary, spec, seed)
    if spec.kind == "database":
        return database_blocks(vocabulary, spec, seed)
    return media_blocks(spec, seed)


def generate(root: Path, size: int, seed: int) -> Dataset:
    """Write the dataset under `root` (made if missing); every file exactly its planned size."""
    dataset = plan(size, seed)
    vocabulary = Vocabulary.make(seed)
    for spec in dataset.files:
        path = root / spec.path
        path.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(path, "wb") as f:
            for block in blocks(vocabulary, spec, seed):
                f.write(block)
                written += len(block)
        if written != spec.size:
            raise AssertionError(f"{spec.path}: made {written} bytes, planned {spec.size}")
    return dataset


# -- the standard edit ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Insert:
    """`data` inserted at `offset` of `path`: what follows moves `len(data)` bytes on."""

    path: str
    offset: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class Append:
    path: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """Whole 4 KiB pages of `path` written over in place, by page number."""

    path: str
    pages: tuple[tuple[int, bytes], ...]


@dataclasses.dataclass(frozen=True)
class Edit:
    """The standard edit of a dataset, planned in full before anything is written."""

    inserts: tuple[Insert, ...]
    appends: tuple[Append, ...]
    rewrites: tuple[Rewrite, ...]

    @property
    def inserted(self) -> int:
        return sum(len(i.data) for i in self.inserts)

    @property
    def appended(self) -> int:
        return sum(len(a.data) for a in self.appends)

    @property
    def rewritten(self) -> int:
        return sum(len(page) for r in self.rewrites for _, page in r.pages)

    @property
    def logical(self) -> int:
        """The logical change: bytes inserted + appended + rewritten."""
        return self.inserted + self.appended + self.rewritten


def _inserts(dataset: Dataset, vocabulary: Vocabulary, rng: random.Random) -> list[Insert]:
    """INSERT_BYTES in the middle of INSERT_DOCUMENTS documents and INSERT_LOGS logs, each
    at the line start nearest the middle's offset (an inserted line)."""
    documents = [f for f in dataset.of_kind("document") if f.size >= 2 * INSERT_BYTES]
    logs = dataset.of_kind("log")
    chosen = rng.sample(documents, min(INSERT_DOCUMENTS, len(documents)))
    chosen += rng.sample(logs, min(INSERT_LOGS, len(logs)))
    out = []
    for spec in sorted(chosen, key=lambda s: s.path):
        if spec.kind == "log":
            writer = LogWriter(vocabulary, rng, Path(spec.path).stem)
            data = writer.line(INSERT_BYTES, EDIT_EPOCH)
        else:
            data = vocabulary.line(rng, INSERT_BYTES)
        out.append(Insert(spec.path, spec.size // 2, data))
    return out


def _appends(dataset: Dataset, vocabulary: Vocabulary, rng: random.Random) -> list[Append]:
    """A few KiB of new whole lines at the end of every log."""
    out = []
    for spec in dataset.of_kind("log"):
        writer = LogWriter(vocabulary, rng, Path(spec.path).stem)
        size = rng.randint(APPEND_MIN, APPEND_MAX)
        text = writer.text(size + 200, EDIT_EPOCH)
        out.append(Append(spec.path, text[: text.rindex(b"\n", 0, size) + 1]))
    return out


def _rewrites(
    dataset: Dataset, vocabulary: Vocabulary, rng: random.Random, seed: int
) -> list[Rewrite]:
    """REWRITE_SHARE of each database file's pages, picked at random, given new contents."""
    out = []
    for spec in dataset.of_kind("database"):
        count = spec.size // PAGE
        picked = sorted(rng.sample(range(count), max(1, math.ceil(count * REWRITE_SHARE))))
        pages = Pages(vocabulary, seed, spec.path)
        noise = Noise(f"{seed}/{spec.path}/edit")
        new = tuple((n, pages.page(n, 10**6 + n, rng, noise)) for n in picked)
        out.append(Rewrite(spec.path, new))
    return out


def plan_edit(dataset: Dataset) -> Edit:
    """The standard edit of `dataset`, from its seed and its planned file sizes."""
    rng = _rng(dataset.seed, "edit")
    vocabulary = Vocabulary.make(dataset.seed)
    return Edit(
        inserts=tuple(_inserts(dataset, vocabulary, rng)),
        appends=tuple(_appends(dataset, vocabulary, rng)),
        rewrites=tuple(_rewrites(dataset, vocabulary, rng, dataset.seed)),
    )


def _insert(path: Path, insert: Insert) -> None:
    """Rewrite from the offset on: the inserted bytes, then the old tail, in place."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        tail = os.pread(fd, size - insert.offset, insert.offset)
        os.pwrite(fd, insert.data + tail, insert.offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, append: Append) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, append.data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite(path: Path, rewrite: Rewrite) -> None:
    """pwrite of each page at its place; no truncation, the size stays."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for number, page in rewrite.pages:
            os.pwrite(fd, page, number * PAGE)
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_edit(root: Path, edit: Edit) -> None:
    """Make the edit to the dataset under `root` (a mount or a plain copy), each file fsynced
    as an application would. Inserts come before appends, so that their offsets hold."""
    for insert in edit.inserts:
        _insert(root / insert.path, insert)
    for append in edit.appends:
        _append(root / append.path, append)
    for rewrite in edit.rewrites:
        _rewrite(root / rewrite.path, rewrite)


def edited_paths(edit: Edit) -> Sequence[str]:
    """The files the edit touches, each once."""
    paths = [i.path for i in edit.inserts] + [a.path for a in edit.appends]
    return sorted(set(paths + [r.path for r in edit.rewrites]))

"""What a stored tree blob holds references to: the edges of hierarchical reference counting.

A snapshot keeps its chunks without touching each of them: the snapshot holds one reference on
its root blob, and every stored tree blob holds one reference on each distinct chunk or blob it
names (its subdirectories' tree blobs, its files' extent-list blobs and data chunks). A blob
takes these references once, when it is first stored; a new parent only adds one reference to
a reused child. When a blob's count drops to zero, `blob_children` tells which references to
give back (docs/ARCHITECTURE.md, "Snapshot retention").
"""

from __future__ import annotations

from tierfs.snap import treeformat as tf


def ordered_children(blob: bytes) -> list[bytes]:
    """The distinct ids a blob names, in the order it names them: entries by name, each
    file's extents by offset. The replicator packs chunks in this order, so that a file's
    chunks lie back to back in a pack and a reader fetches them in few ranged GETs."""
    magic = bytes(blob[:4])
    ids: list[bytes] = []
    if magic == tf.EXTENT_LIST_MAGIC:
        ids = [x.chunk_id for x in tf.decode_extent_list(blob)]
    else:
        for entry in tf.decode_tree(blob):
            if entry.tree_id:
                ids.append(entry.tree_id)
            ids += [x.chunk_id for x in entry.extents]
            ids += [ref.blob_id for ref in entry.extent_lists]
    return list(dict.fromkeys(ids))


def blob_children(blob: bytes) -> set[bytes]:
    """The distinct ids a tree, root or extent-list blob names (raises TreeFormatError)."""
    return set(ordered_children(blob))

"""Upstream object stores (the regional tier): one interface, a local and an S3 backend.

See `objectstore` for the interface and its write-once rule.
"""

from tierfs.upstream.objectstore import (
    ObjectExists,
    ObjectMissing,
    ObjectStore,
    ObjectStoreError,
    ObjectTooLarge,
    StoreRefused,
    StoreSettings,
    StoreUnavailable,
    open_store,
)

__all__ = [
    "ObjectExists",
    "ObjectMissing",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectTooLarge",
    "StoreRefused",
    "StoreSettings",
    "StoreUnavailable",
    "open_store",
]

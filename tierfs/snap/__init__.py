"""Snapshots: signing keys, site certificates, signed manifests and the recovery bundle.

`keys` holds the site and domain Ed25519 keys, the site certificate the domain key issues, the
canonical encodings that are signed, and the recovery bundle; `manifest` the snapshot manifest
and its signed envelope. Formats: docs/FORMAT.md ("Keys and certificates", "Snapshot
manifest", "Recovery bundle").
"""

"""tierfs: a tiered, self-protecting FUSE filesystem for edge sites."""

__version__ = "0.1.0"

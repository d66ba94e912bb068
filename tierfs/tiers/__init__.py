"""Where chunks live: the hot tier on the data directory (later: ZNS zones, object stores)."""

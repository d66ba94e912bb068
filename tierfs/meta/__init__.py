"""The LMDB metadata index: key schema, record codecs and the group-committing store."""

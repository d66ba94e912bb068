"""The data path: chunking, content ids, the chunk frame codec, and sealing."""

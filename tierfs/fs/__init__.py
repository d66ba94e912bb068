"""The filesystem: namespace operations, staging, and the pyfuse3 boundary."""

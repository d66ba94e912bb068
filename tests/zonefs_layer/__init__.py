"""A test-only zonefs: the emulated zoned device presented with zonefs's rules, over FUSE.

No zonefs exists on the machines the tests run on (the kernel has zoned support compiled
out), so `tierfs.tiers.zns.zonefs.ZonefsDevice` is tested against this layer instead.

* `zones`: zonefs's per-file rules (sizes, append-only O_DIRECT writes, truncate to reset or
  finish, explicit-open, I/O error handling) over an `EmulatedZonedDevice`;
* `layer`: the pyfuse3 filesystem serving them (run in its own process), with fault
  injection and the device's own zone view as extended attributes;
* `process`: start and stop that process from a test; stopping always unmounts.
"""

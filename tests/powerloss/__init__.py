"""Crash and power-loss test support for tierfs.

* `layer`: a test-only FUSE filesystem (run in its own process) that simulates a disk losing
  power: it forgets every change that was not made durable by fsync. Its module docstring
  states the durability model.
* `fuse`: the minimal FUSE server the layer runs on (the kernel protocol on /dev/fuse).
* `process`: start, cut the power of and stop that process from a test.
* `model`: what each test file may hold after a crash, and the check of a remounted tierfs
  against it.
* `workload`: file operations on a mounted tierfs that record their effects in the model
  (a scripted workload that reaches every crash point, and a seeded random one).
* `rig`: one tierfs under test: arming crash points, crashing (kill -9, optionally with a
  power cut), remounting and checking.
"""

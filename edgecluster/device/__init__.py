"""The device an agent runs on: measure it (`profile`) or emulate a small one (`emulated`).

`emulated` caps a process's memory, CPU and disk reads with cgroup v1 groups, for
benchmarks under a real limit and for the testbed (`edgecluster.testbed`).
"""

"""Run a compose file's services on one Linux host as a cluster of emulated devices.

Each service gets a network namespace on a private bridge (mDNS works across
them), an emulated device (cgroup v1 memory, CPU and disk-read limits from the
compose file), its own /etc/hosts so service names resolve, and optional link
shaping from the `x-edgecluster` extension. Published ports are forwarded from
127.0.0.1. `edge-testbed up|down|status` is the command; `runner` the library.
"""

"""Emulated devices under real cgroup v1 limits (root only; skipped with the reason elsewhere)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgecluster.device import block, cgroup_v1
from edgecluster.device.emulated import (
    DeviceLimits,
    EmulatedDevice,
    available,
    cleanup_stale,
    main,
)
from edgecluster.device.profile import cgroup_cpu_quota

REASON = available()


def needs_cgroups(test):  # type: ignore[no-untyped-def]
    return pytest.mark.root(pytest.mark.skipif(REASON is not None, reason=REASON or "")(test))


PREFIX = f"pytest-{os.getpid()}-"


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    if REASON is None:
        assert cleanup_stale(PREFIX) == [], "a test left cgroups behind"


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="at least"):
        DeviceLimits(memory_bytes=1000)
    with pytest.raises(ValueError, match="0.01"):
        DeviceLimits(cpus=0.001)
    with pytest.raises(ValueError, match="cgroup name"):
        EmulatedDevice("../etc", DeviceLimits())
    with pytest.raises(RuntimeError, match="not open"):
        EmulatedDevice("never-opened", DeviceLimits()).popen(["true"])


def test_block_device_parsing() -> None:
    assert block.parse_device("254:3") == (254, 3)
    with pytest.raises(ValueError, match="lsblk"):
        block.parse_device("/dev/does-not-exist")
    with pytest.raises(ValueError, match="not a block device"):
        block.parse_device("/dev/null")


@needs_cgroups
def test_memory_hog_is_oom_killed() -> None:
    hog = "b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096])"
    with EmulatedDevice(PREFIX + "mem", DeviceLimits(memory_bytes=64 << 20)) as device:
        returncode = device.popen([sys.executable, "-c", hog]).wait(timeout=30)
        assert returncode == -9
        assert device.oom_killed()
        assert device.peak_memory_bytes() <= 64 << 20
        paths = list(device.paths.values())
    assert not any(path.exists() for path in paths)


@needs_cgroups
def test_small_process_fits_and_reports_peak() -> None:
    with EmulatedDevice(PREFIX + "fit", DeviceLimits(memory_bytes=128 << 20)) as device:
        assert device.popen([sys.executable, "-c", "b = bytearray(20 << 20)"]).wait() == 0
        assert not device.oom_killed()
        assert 20 << 20 < device.peak_memory_bytes() <= 128 << 20


@needs_cgroups
def test_cpu_quota_limits_a_busy_loop() -> None:
    busy = "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass"
    with EmulatedDevice(PREFIX + "cpu", DeviceLimits(cpus=0.25)) as device:
        assert cgroup_v1.read_value(device.paths["cpu"], "cpu.cfs_quota_us") == "25000"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert device.popen([sys.executable, "-c", busy]).wait(timeout=30) == 0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu_s < 0.4, f"used {cpu_s:.2f} s of CPU under a 0.25-CPU quota"


@needs_cgroups
def test_set_cpus_changes_the_quota_of_a_running_device() -> None:
    with EmulatedDevice(PREFIX + "setcpu", DeviceLimits(memory_bytes=64 << 20)) as device:
        assert cgroup_v1.read_value(device.paths["cpu"], "cpu.cfs_quota_us") == "-1"
        proc = device.popen([sys.executable, "-c", "import time; time.sleep(30)"])
        device.set_cpus(0.3)
        assert cgroup_v1.read_value(device.paths["cpu"], "cpu.cfs_quota_us") == "30000"
        device.set_cpus(None)
        assert cgroup_v1.read_value(device.paths["cpu"], "cpu.cfs_quota_us") == "-1"
        with pytest.raises(ValueError, match="kernel minimum"):
            device.set_cpus(0.001)
        assert proc.poll() is None
    proc.wait(timeout=10)


@needs_cgroups
def test_reads_do_not_poll_under_a_cpu_quota() -> None:
    """Polling before a blocking read would spend an emulated device's CPU quota."""
    probe = "from edgecluster.net.polling_reader import default_spin_us; print(default_spin_us())"
    env = {k: v for k, v in os.environ.items() if k != "EDGE_SPIN_US"}
    with EmulatedDevice(PREFIX + "spin", DeviceLimits(cpus=0.5)) as device:
        proc = device.popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, env=env)
        out, _ = proc.communicate(timeout=60)
    assert float(out) == 0.0
    free = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    if cgroup_cpu_quota() is None:  # this test itself may run under a quota
        assert float(free.stdout) > 0.0, "without a quota reads poll first"


@needs_cgroups
def test_disk_reads_are_throttled(tmp_path: Path) -> None:
    data = tmp_path / "blob"
    with data.open("wb") as out:
        out.write(os.urandom(1 << 20) * 64)
        out.flush()
        os.fsync(out.fileno())
    reader = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)\n"
        "while os.read(fd, 1 << 20): pass\n"
    )
    limits = DeviceLimits(read_bytes_per_s=32_000_000)
    with EmulatedDevice(PREFIX + "io", limits, io_path=tmp_path) as device:
        start = time.monotonic()
        assert device.popen([sys.executable, "-c", reader, str(data)]).wait(timeout=30) == 0
        elapsed_s = time.monotonic() - start
    assert elapsed_s >= 1.5, f"64 MiB at 32 MB/s took only {elapsed_s:.2f} s"


@needs_cgroups
def test_close_kills_leftovers_and_cleanup_stale_finds_crashed_groups() -> None:
    device = EmulatedDevice(PREFIX + "crash", DeviceLimits(memory_bytes=64 << 20)).open()
    sleeper = device.popen(["sleep", "60"])
    assert device.pids() == [sleeper.pid]
    assert cleanup_stale(PREFIX + "crash") == [PREFIX + "crash"]  # as a later run would
    assert sleeper.wait(timeout=5) == -9
    assert not any(path.exists() for path in device.paths.values())
    device.close()  # idempotent


@needs_cgroups
def test_existing_group_is_refused() -> None:
    with (
        EmulatedDevice(PREFIX + "dup", DeviceLimits()),
        pytest.raises(FileExistsError, match="cleanup_stale"),
    ):
        EmulatedDevice(PREFIX + "dup", DeviceLimits()).open()


@needs_cgroups
def test_cli_runs_command_and_prints_peak(capfd: pytest.CaptureFixture[str]) -> None:
    argv = ["--memory", "64MiB", "--cpus", "0.5", "--name", PREFIX + "cli", "--"]
    assert main([*argv, sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert "peak memory:" in capfd.readouterr().err


@needs_cgroups
def test_cli_as_module() -> None:
    cmd = [sys.executable, "-m", "edgecluster.device.emulated", "--memory", "64MiB"]
    cmd += ["--name", PREFIX + "mod", "--", "true"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "oom-killed: no" in done.stderr


def test_available_names_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert available(root=tmp_path) is not None  # no controllers mounted there
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in (available() or "")

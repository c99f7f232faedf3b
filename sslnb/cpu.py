"""Training on a CPU that other processes share (a 2-core Colab VM or laptop).

torch runs each operator on all its intra-op threads and waits for the slowest at the end. When
another busy process holds one of the cores, one of our threads only runs when the scheduler
gives it that core back (milliseconds later), and every one of the thousands of operators of a
step waits for it: on this 2-core machine, beside one busy process, 2 threads trained at 26% of
their idle speed and 1 thread at 70% of it (benchmarks/contention.py). Waiting passively instead
of spinning (OMP_WAIT_POLICY=PASSIVE, tried by hand) did not help (29%): the barrier is the cost.

So the loop asks, every few seconds, how much CPU the other processes took (Linux's /proc/stat,
minus this process's own time) and uses only the cores they leave free, never more threads than
it started with. Elsewhere (no /proc, a container limited to part of the machine, `--compile`,
whose CPU kernels fix their thread count), on a GPU, or with one thread it does nothing.
"""
from __future__ import annotations

import os
import time

import torch

INTERVAL_S = 1.0  # how often the share is re-measured: reading two small files, microseconds


def _read_cpu_times() -> tuple[int, int, int]:
    """(busy jiffies of the whole machine, this process's jiffies, number of CPUs) from /proc."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in lines[0].split()[1:9])
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    own = int(fields[11]) + int(fields[12])  # utime + stime of every thread of this process
    return user + nice + system + irq + softirq + steal, own, cpus


def _sees_whole_machine(cpus: int) -> bool:
    """Whether /proc/stat's load is ours to read: it describes the whole machine, so only a process
    that may use every CPU of it, without a container's CPU quota, can judge its free cores by it."""
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) != cpus:
        return False
    for path, unlimited in (("/sys/fs/cgroup/cpu.max", "max"), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1")):
        try:
            with open(path) as f:
                return f.read().split()[0] == unlimited
        except (OSError, IndexError):
            continue
    return True


def free_threads(others_busy: float, cpus: int, most: int) -> int:
    """Threads to use when other processes keep `others_busy` CPUs busy: the free cores (a core
    the others use a quarter of the time or less still counts as free), at least 1, at most `most`."""
    return max(1, min(most, int(cpus - others_busy + 0.25)))


class SharedCpuThreads:
    """Keeps torch's intra-op threads at the cores other processes leave free (see module doc).
    Call `update()` often (it acts every `INTERVAL_S` seconds) and `restore()` at the end."""

    def __init__(self, device: torch.device, interval_s: float = INTERVAL_S, enabled: bool = True):
        self.most = torch.get_num_threads()  # what the user (or torch) chose: the ceiling
        self.interval_s = interval_s
        self.enabled = enabled and device.type == "cpu" and self.most > 1
        if self.enabled:
            try:
                self._last = (time.perf_counter(), *_read_cpu_times())
                self.enabled = _sees_whole_machine(self._last[3])  # in a container: threads stay as they are
            except (OSError, ValueError, IndexError):  # not Linux: threads stay as they are
                self.enabled = False

    def update(self) -> None:
        if not self.enabled or time.perf_counter() - self._last[0] < self.interval_s:
            return
        try:
            now, busy, own, cpus = time.perf_counter(), *_read_cpu_times()
        except (OSError, ValueError, IndexError):  # /proc went away: stop adapting, never stop training
            self.restore()
            self.enabled = False
            return
        t0, busy0, own0, _ = self._last
        hz = os.sysconf("SC_CLK_TCK")
        others = max(0.0, ((busy - busy0) - (own - own0)) / hz / (now - t0))  # CPUs the others used
        threads = free_threads(others, cpus, self.most)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self._last = (now, busy, own, cpus)

    def restore(self) -> None:
        if self.enabled:
            torch.set_num_threads(self.most)

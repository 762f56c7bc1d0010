"""CPU time read from /proc, for the benchmarks that say where a run's CPU went.

A job's work is spread over a dozen processes (its driver, the Ray it started, Ray's workers and
daemons), most of which `resource.getrusage` of the benchmark never sees: they are not its
children, or end unreaped. `processes` reads every live process's `/proc/<pid>/stat` once;
`machine_busy_seconds` reads the machine's own counter, which also holds what ended.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessCpu:
    name: str  # the kernel's 15-character comm: Ray sets it to the actor or task a worker runs
    parent: int
    session: int
    seconds: float  # user + system
    reaped_seconds: float  # user + system of the children it has waited for


def processes() -> dict[int, ProcessCpu]:
    """Every live process by pid; one that ends while it is read is left out."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        # The name is in parentheses and may hold spaces; the fields after it are plain.
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
        found[int(entry)] = ProcessCpu(
            name, int(fields[1]), int(fields[3]), (utime + stime) / TICKS, (cutime + cstime) / TICKS
        )
    return found


def machine_busy_seconds() -> float:
    """The machine's busy CPU-seconds since boot, all cores: user + nice + system + irq +
    softirq + steal of /proc/stat (idle and iowait left out)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICKS

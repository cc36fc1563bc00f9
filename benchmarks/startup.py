"""Start-up time of the commands a user types first: ``--help``, ``plugins``, ``validate``, ``models``.

    python benchmarks/startup.py [--repeat 7] [--target 0.5]

Each command runs ``--repeat`` times as a fresh ``python -m sslbench`` process (the first run warms
the page cache and is not counted); the median wall time is compared with the target (0.5 s on an
idle 2-core machine). The load average is printed beside the figures: on a busy machine the wall
times say more about the other processes than about sslbench, so the median CPU time of the process
(user + system, from ``wait4``) is printed too — on an idle machine the wall time is that plus I/O.
``-X importtime`` of the slowest command lists the modules that cost the most.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["plugins"], ["validate", "quickstart"], ["models"])


def timed_runs(command: list[str], repeat: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of each run after the first."""
    walls, cpus = [], []
    for attempt in range(repeat + 1):
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "sslbench", *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert child.stderr is not None
        err = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"sslbench {' '.join(command)} failed: {err.decode(errors='replace').strip()[-500:]}")
        if attempt:  # the first run fills the page cache
            walls.append(elapsed)
            cpus.append(usage.ru_utime + usage.ru_stime)
    return walls, cpus


def slowest_imports(command: list[str], top: int = 8) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sslbench", *command], capture_output=True, text=True
    )
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
            if cumulative.isdigit():
                rows.append((int(cumulative), name))
    rows.sort(reverse=True)
    return [f"{us / 1e3:8.1f} ms  {name}" for us, name in rows[:top]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--target", type=float, default=0.5, help="seconds")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average {load:.2f}; median of {args.repeat} runs each")
    worst: tuple[float, list[str]] = (0.0, [])
    met = True
    for command in COMMANDS:
        times, cpu = timed_runs(command, args.repeat)
        median = statistics.median(times)
        ok = median <= args.target
        met &= ok
        worst = max(worst, (median, command))
        print(
            f"sslbench {' '.join(command):<22} wall median {median:5.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f}), CPU median {statistics.median(cpu):.2f} s  "
            f"target ≤ {args.target} s: {'met' if ok else 'MISSED'}"
        )
    print(f"slowest imports of `sslbench {' '.join(worst[1])}` (cumulative):")
    for line in slowest_imports(worst[1]):
        print("  " + line)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

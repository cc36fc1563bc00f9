"""Peak resident memory of the real ``sslbench run`` on a memory-mapped 1.28M × 2048 feature file.

    python benchmarks/memory_pipeline.py                  # 1,281,167 × 2048 train (10.5 GB), k = 1000
    python benchmarks/memory_pipeline.py --quick          # 60,000 × 256, 100 classes, 1 epoch: a smoke run
    python benchmarks/memory_pipeline.py --workdir /big --keep   # keep (and later reuse) the .npy files

Writes a ``features`` dataset as .npy files (class blobs: a Gaussian centre per class plus Gaussian
noise, float32, seeded; int64 labels), chunk by chunk through ``np.lib.format.open_memmap`` so that
writing it stays at bounded memory, and a spec that clusters it with every PCA component kept
(``pca_dims: null``), k = the 1000 classes, ``--epochs`` epochs (default 2), one seed, the torch
backend on the CPU, without the feature cache. Then runs ``python -m sslbench run SPEC --out DIR`` as
a child process and measures that process's peak resident set size (RSS) three ways: ``VmRSS`` and
``VmHWM`` (the kernel's own high-water mark) polled from ``/proc/<pid>/status`` every
``--interval`` seconds, and the ``ru_maxrss`` that ``wait4`` (and ``RUSAGE_CHILDREN``) report once
the child exits. RSS counts the pages of the memory-mapped features that the process has mapped in
(``RssFile``) as well as its own allocations (``RssAnon``, reported alongside).

Stage lines on the child's stderr (``sslbench: stage <name> …``) split the run: the table gives the
wall time of each stage (from its line to the next one) and the peak RSS sampled during it, at the
polling resolution (a peak between two polls that straddle a stage change counts for both stages,
as does one that only ``ru_maxrss`` saw, after the last poll). The CLI prints stage lines with
``--stages`` and this script passes it (and ``--no-progress``) when ``sslbench run --help`` lists it;
without stage lines only the whole run is reported. The last line reads e.g.
``peak RSS 2.41 GB (stage kmeans) — target ≤ 3.0 GB: met``; exit status 0 when met, 1 when missed,
2 when the run failed or there is no room for the files. GB here is 2^30 bytes, as in
``memory_memmap.py``.

The files need about 11 GB, plus as much again for the projected copies a streaming core writes
(its temporary files go to the work directory: ``TMPDIR`` points there); by default they go to a
temporary directory on the disk with the most free space (not a tmpfs) and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
GB = 1024**3
CHUNK_ROWS = 65536
STAMP = "memory_pipeline_data.json"

#: ``sslbench: … stage <name> …`` — the word after ``stage`` names the stage that starts.
STAGE_LINE = re.compile(r"sslbench:.*?\bstage\s+([^\s:,;()\[\]]+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Workload:
    rows: int
    val_rows: int
    dims: int
    classes: int
    epochs: int
    seed: int

    def feature_bytes(self) -> int:
        return (self.rows + self.val_rows) * self.dims * 4

    def files(self, folder: Path) -> dict[str, tuple[Path, Path]]:
        stem = f"{self.dims}d_{self.classes}c_seed{self.seed}"
        return {
            split: (folder / f"{split}_{n}x{stem}_features.npy", folder / f"{split}_{n}x{stem}_labels.npy")
            for split, n in (("train", self.rows), ("val", self.val_rows))
        }


def class_centres(classes: int, dims: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    return rng.standard_normal((classes, dims), dtype=np.float32)


def write_split(
    features_path: Path, labels_path: Path, rows: int, centres: np.ndarray, seed: int, split_id: int
) -> None:
    """``rows`` blobs ``centre[label] + N(0, 1)``, written ``CHUNK_ROWS`` at a time.

    Each chunk maps the file afresh and unmaps it after the write, so the pages written so far do
    not stay in this process's RSS; each chunk has its own seeded generator.
    """
    classes, dims = centres.shape
    for path, dtype, shape in ((features_path, np.float32, (rows, dims)), (labels_path, np.int64, (rows,))):
        created = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        del created
    for start in range(0, rows, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, rows)
        rng = np.random.default_rng([seed, split_id, start])
        labels = rng.integers(0, classes, stop - start, dtype=np.int64)
        block = rng.standard_normal((stop - start, dims), dtype=np.float32)
        for part in range(0, stop - start, 8192):  # the gathered centres one slice at a time, not a second block
            block[part : part + 8192] += centres[labels[part : part + 8192]]
        for path, values in ((features_path, block), (labels_path, labels)):
            mapped = np.lib.format.open_memmap(path, mode="r+")
            mapped[start:stop] = values
            mapped.flush()
            del mapped


def _data_meta(workload: Workload) -> dict[str, int]:
    meta = {"rows": workload.rows, "val_rows": workload.val_rows, "dims": workload.dims}
    return meta | {"classes": workload.classes, "seed": workload.seed, "chunk_rows": CHUNK_ROWS}


def data_present(workload: Workload, folder: Path) -> bool:
    """Whether an earlier ``--keep`` run left complete files of this workload in ``folder``."""
    stamp = folder / STAMP
    try:
        matches = json.loads(stamp.read_text()) == _data_meta(workload)
    except (OSError, ValueError):
        return False
    return matches and all(p.is_file() for pair in workload.files(folder).values() for p in pair)


def ensure_data(workload: Workload, folder: Path) -> tuple[dict[str, tuple[Path, Path]], bool]:
    """The split files, written unless a previous ``--keep`` run left matching ones; and whether they were."""
    files = workload.files(folder)
    if data_present(workload, folder):
        return files, True
    stamp = folder / STAMP
    stamp.unlink(missing_ok=True)
    centres = class_centres(workload.classes, workload.dims, workload.seed)
    for split_id, (split, (features_path, labels_path)) in enumerate(files.items(), start=1):
        rows = workload.rows if split == "train" else workload.val_rows
        t0 = time.perf_counter()
        write_split(features_path, labels_path, rows, centres, workload.seed, split_id)
        size = features_path.stat().st_size / GB
        print(f"wrote {split}: {rows:,} × {workload.dims} float32 ({size:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    stamp.write_text(json.dumps(_data_meta(workload)))  # written last: the files are complete
    return files, False


def write_spec(workload: Workload, files: dict[str, tuple[Path, Path]], folder: Path) -> Path:
    splits = {split: {"features": str(f), "labels": str(lab)} for split, (f, lab) in files.items()}
    spec = {
        "name": "memory_pipeline",
        "models": [{"id": "raw"}],
        "datasets": [
            {
                "id": "features",
                "options": {"splits": splits, "num_classes": workload.classes},
                "fit_split": "train",
                "eval_split": "val",
            }
        ],
        "protocol": {
            "pca_dims": [None],
            "k": [None],
            "epochs": [workload.epochs],
            "seeds": [0],
            "backend": "torch",
        },
        "extraction": {"cache": False},
        "cache_dir": str(folder / "cache"),
        "device": "cpu",
    }
    path = folder / "memory_pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Where the files go


def _mount_types() -> list[tuple[str, str]]:
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    return [(parts[1], parts[2]) for parts in (line.split() for line in lines) if len(parts) >= 3]


def is_memory_backed(path: Path) -> bool:
    """Whether ``path`` is on a tmpfs/ramfs, whose files would live in RAM."""
    resolved = str(path.resolve())
    best, fstype = "", ""
    for mount, kind in _mount_types():
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, fstype = mount, kind
    return fstype in ("tmpfs", "ramfs")


def roomiest_dir() -> Path:
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp"), Path.home(), Path.cwd()]
    usable = [p for p in candidates if p.is_dir() and os.access(p, os.W_OK) and not is_memory_backed(p)]
    if not usable:
        return Path(tempfile.gettempdir())
    return max(usable, key=lambda p: shutil.disk_usage(p).free)


# --------------------------------------------------------------------------------------------------
# Measuring the child


@dataclass
class Sample:
    t: float  # monotonic seconds
    rss: int  # bytes
    hwm: int
    anon: int


@dataclass
class Measurement:
    start: float
    end: float
    returncode: int
    samples: list[Sample] = field(default_factory=list)
    stages: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, name), in order
    wait4_maxrss: int = 0  # bytes, this child (and its reaped descendants)
    children_maxrss: int = 0  # bytes, RUSAGE_CHILDREN: every child this process waited for
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def polled_peak(self) -> int:
        return max((max(s.rss, s.hwm) for s in self.samples), default=0)

    @property
    def peak(self) -> int:
        return max(self.polled_peak, self.wait4_maxrss)


def read_status(pid: int) -> tuple[int, int, int] | None:
    """VmRSS, VmHWM, RssAnon of ``pid`` in bytes; ``None`` once it has exited (a zombie has none)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            values[key] = int(rest.split()[0]) * 1024  # kB
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"]), values.get("RssAnon", 0)


def parse_stage(line: str) -> str | None:
    match = STAGE_LINE.search(ANSI.sub("", line))
    return match.group(1) if match else None


def _poll(pid: int, interval: float, samples: list[Sample], done: threading.Event) -> None:
    while not done.is_set():
        status = read_status(pid)
        if status is not None:
            samples.append(Sample(time.monotonic(), *status))
        done.wait(interval)


def _read_stderr(stream: IO[bytes], log: IO[str], stages: list[tuple[float, str]], tail: list[str], echo: bool) -> None:
    """Splits the child's stderr on newlines and carriage returns (progress bars), timestamping stage lines."""
    pending = b""
    while True:
        chunk = stream.read1(65536)  # type: ignore[attr-defined]
        if not chunk:
            break
        pending += chunk
        parts = re.split(rb"[\r\n]", pending)
        pending = parts.pop()
        now = time.monotonic()
        for raw in parts:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            log.write(line + "\n")
            tail.append(line)
            del tail[:-40]
            name = parse_stage(line)
            if name is not None:
                stages.append((now, name))
            if echo:
                print(f"  │ {line}", file=sys.stderr, flush=True)
    if pending.strip():
        line = pending.decode(errors="replace").rstrip()
        log.write(line + "\n")
        tail.append(line)
        name = parse_stage(line)
        if name is not None:
            stages.append((time.monotonic(), name))
    log.flush()


def measure(
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    log_dir: Path,
    interval: float = 0.2,
    echo: bool = True,
) -> Measurement:
    """Runs ``command`` and measures its peak RSS and stages (see the module docstring)."""
    with open(log_dir / "child.stdout.log", "w") as out, open(log_dir / "child.stderr.log", "w") as err_log:
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        result = Measurement(start=start, end=start, returncode=0)
        done = threading.Event()
        poller = threading.Thread(target=_poll, args=(proc.pid, interval, result.samples, done), daemon=True)
        reader = threading.Thread(
            target=_read_stderr, args=(proc.stderr, err_log, result.stages, result.stderr_tail, echo), daemon=True
        )
        poller.start()
        reader.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # reaps it and gives this child's own ru_maxrss
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        result.end = time.monotonic()
        proc.returncode = result.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        poller.join()
        reader.join()
        proc.stderr.close()
    result.wait4_maxrss = usage.ru_maxrss * 1024  # kilobytes on Linux
    result.children_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


@dataclass
class StageRow:
    name: str
    count: int = 0
    seconds: float = 0.0
    peak: int = 0
    peak_anon: int = 0
    samples: int = 0


def stage_rows(m: Measurement) -> list[StageRow]:
    """Per stage name (first-seen order; repeats are summed): wall time and sampled peaks.

    Before the first stage line the child is ``startup``. A sample's VmRSS belongs to the stage
    current at its time. A rise of VmHWM since the previous sample is a peak reached in between; it
    counts for every stage active in that interval (usually one). Likewise a final ``ru_maxrss``
    above every sample counts for the stages active after the last sample.
    """
    bounds = [(m.start, "startup"), *m.stages]
    ends = [t for t, _ in bounds[1:]] + [m.end]
    rows: dict[str, StageRow] = {}
    for (t, name), until in zip(bounds, ends, strict=True):
        row = rows.setdefault(name, StageRow(name))
        row.count += 1
        row.seconds += max(0.0, until - t)

    def active(after: float, until: float) -> set[str]:
        return {name for (t, name), end in zip(bounds, ends, strict=True) if t <= until and end > after}

    starts = [t for t, _ in bounds]
    previous_t, last_hwm = m.start, 0
    for sample in m.samples:
        row = rows[bounds[max(0, bisect.bisect_right(starts, sample.t) - 1)][1]]
        row.peak = max(row.peak, sample.rss)
        row.peak_anon = max(row.peak_anon, sample.anon)
        row.samples += 1
        if sample.hwm > last_hwm:
            for name in active(previous_t, sample.t):
                rows[name].peak = max(rows[name].peak, sample.hwm)
        previous_t, last_hwm = sample.t, max(last_hwm, sample.hwm)
    if m.wait4_maxrss > m.polled_peak:
        for name in active(previous_t, m.end):
            rows[name].peak = max(rows[name].peak, m.wait4_maxrss)
    return list(rows.values())


def report(m: Measurement, limit_gb: float) -> tuple[str, bool]:
    """Prints the table and returns the final line and whether the target was met."""
    rows = stage_rows(m)
    whole = StageRow("whole run", 1, m.end - m.start, m.peak, max((s.anon for s in m.samples), default=0))
    whole.samples = len(m.samples)
    header = f"{'stage':<16} {'wall s':>9} {'peak RSS GB':>12} {'peak anon GB':>13} {'samples':>8}"
    print()
    print(header)
    print("─" * len(header))
    shown = rows if m.stages else []
    for row in [*shown, whole]:
        if row is whole and shown:
            print("─" * len(header))
        name = row.name if row.count == 1 else f"{row.name} ×{row.count}"
        print(f"{name:<16} {row.seconds:>9.1f} {row.peak / GB:>12.2f} {row.peak_anon / GB:>13.2f} {row.samples:>8}")
    print()
    if not m.stages:
        print("no `sslbench: stage …` lines on the child's stderr: the peak is for the whole run only")
    print(
        f"cross-check: polled VmHWM/VmRSS {m.polled_peak / GB:.2f} GB, wait4 ru_maxrss {m.wait4_maxrss / GB:.2f} GB, "
        f"RUSAGE_CHILDREN ru_maxrss {m.children_maxrss / GB:.2f} GB (max over every child waited for)"
    )
    top = max(row.peak for row in rows)
    peak_stage = "/".join(row.name for row in rows if row.peak == top) if m.stages else None
    if peak_stage and "/" in peak_stage:
        print(f"the peak fell between two polls across a stage change: {peak_stage.replace('/', ' or ')}")
    met = m.peak <= limit_gb * GB
    where = f" (stage {peak_stage})" if peak_stage else ""
    limit = f"{limit_gb:.1f}" if float(limit_gb * 10).is_integer() else f"{limit_gb:g}"
    line = f"peak RSS {m.peak / GB:.2f} GB{where} — target ≤ {limit} GB: {'met' if met else 'MISSED'}"
    return line, met


# --------------------------------------------------------------------------------------------------


def run_help(env: dict[str, str], cwd: Path) -> str:
    """The text of ``python -m sslbench run --help`` ("" when it fails), to see which options exist."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sslbench", "run", "--help"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"note: `sslbench run --help` did not run ({exc})")
        return ""
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        print(f"note: `sslbench run --help` failed (exit {done.returncode}): {last}")
        return ""
    return done.stdout


def child_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # This checkout's sslbench, whatever the child's working directory; its temporary files on this disk.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"  # rich wraps non-terminal output at 80 columns otherwise
    env["TMPDIR"] = str(workdir / "tmp")
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke size: 60,000 × 256, val 5,000, 100 classes, 1 epoch"
    )
    parser.add_argument("--rows", type=int, help="train rows (default 1,281,167)")
    parser.add_argument("--val-rows", type=int, help="val rows (default 50,000)")
    parser.add_argument("--dims", type=int, help="feature dimensions (default 2048)")
    parser.add_argument("--classes", type=int, help="classes = clusters (default 1000)")
    parser.add_argument("--epochs", type=int, help="k-means epochs (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--workdir", type=Path, help="folder for the data, spec and run (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files (a later run reuses them)")
    parser.add_argument("--limit-gb", type=float, default=3.0, help="peak RSS target in GB (default 3.0)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between /proc polls")
    parser.add_argument("--quiet", action="store_true", help="do not echo the child's stderr")
    args = parser.parse_args()

    full = (1_281_167, 50_000, 2048, 1000, 2)
    quick = (60_000, 5_000, 256, 100, 1)
    defaults = quick if args.quick else full
    given = (args.rows, args.val_rows, args.dims, args.classes, args.epochs)
    rows, val_rows, dims, classes, epochs = (g if g is not None else d for g, d in zip(given, defaults, strict=True))
    if min(rows, val_rows, dims, classes, epochs) < 1:
        parser.error("--rows, --val-rows, --dims, --classes and --epochs must be positive")
    workload = Workload(rows, val_rows, dims, classes, epochs, args.seed)

    base = args.workdir if args.workdir is not None else roomiest_dir()
    base.mkdir(parents=True, exist_ok=True)
    reusable = args.workdir is not None and data_present(workload, base)
    features_gb = workload.feature_bytes() / GB
    # The features, the same again for projections a streaming core may write, and 1 GB of slack.
    need = (0 if reusable else workload.feature_bytes()) + workload.feature_bytes() + GB
    free = shutil.disk_usage(base).free
    if free < need:
        print(
            f"not enough disk space in {base}: {free / GB:.1f} GB free, about {need / GB:.1f} GB needed "
            f"({features_gb:.1f} GB of features, as much again for the run's projected copies, 1 GB slack); "
            f"pass --workdir on a larger disk, or fewer --rows / --dims",
            file=sys.stderr,
        )
        return 2
    if is_memory_backed(base):
        print(f"warning: {base} is a tmpfs: the feature files will live in RAM", file=sys.stderr)
    workdir = base if args.workdir is not None else Path(tempfile.mkdtemp(prefix="sslbench-memory-", dir=base))
    made: list[Path] = []

    try:
        print(
            f"workload: train {rows:,} × {dims}, val {val_rows:,} × {dims} float32 ({features_gb:.2f} GB), "
            f"{classes} classes = clusters, all PCA components, {epochs} epoch(s), 1 seed, torch on the CPU"
        )
        print(f"work directory: {workdir} ({free / GB:.0f} GB free)")
        files, reused = ensure_data(workload, workdir)
        if reused:
            print("reusing the data files of an earlier --keep run")
        else:
            made += [p for pair in files.values() for p in pair] + [workdir / STAMP]
        spec = write_spec(workload, files, workdir)
        out_dir, tmp_dir = workdir / "out", workdir / "tmp"
        tmp_dir.mkdir(exist_ok=True)
        made += [spec, out_dir, tmp_dir, workdir / "cache", workdir / "child.stdout.log", workdir / "child.stderr.log"]

        env = child_env(workdir)
        command = [sys.executable, "-m", "sslbench", "run", str(spec), "--out", str(out_dir)]
        # Stage lines (``--stages``) and no progress bars, where this version of the CLI has the options.
        help_text = run_help(env, workdir)
        for option in ("--stages", "--no-progress"):
            if re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text):
                command.append(option)
        print("running:", " ".join(command), flush=True)
        m = measure(command, workdir, env, workdir, interval=args.interval, echo=not args.quiet)
        line, met = report(m, args.limit_gb)
        if m.returncode != 0:
            print(f"\nsslbench run FAILED (exit {m.returncode}); the last lines of its stderr:")
            for text in m.stderr_tail[-15:]:
                print(f"  {text}")
            print(f"{line.split(' — ')[0]} before it failed — no verdict")
            return 2
        print(line)
        return 0 if met else 1
    finally:
        if args.keep:
            print(f"kept: {workdir}")
        elif args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for path in made:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())

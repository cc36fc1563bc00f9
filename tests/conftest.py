from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from sslbench.plugins import Plugins, load_plugins
from sslbench.threads import prefer_sleeping_threads

REPO = Path(__file__).resolve().parents[1]

# As the CLI does: OpenMP threads sleep rather than spin while they wait, so tests on a shared, loaded
# machine do not slow to a crawl. Before anything imports torch.
prefer_sleeping_threads()

# Every test, and every CLI subprocess a test starts, uses a private feature cache.
# (a sub-folder, as the weights-digest cache lives beside the feature cache)
os.environ["SSLBENCH_CACHE"] = str(Path(tempfile.mkdtemp(prefix="sslbench-test-cache-")) / "features")

#: The metrics the paper's code computes, which every run records.
PAPER_METRICS = frozenset(
    {"acc", "acc_majority", "acc_eval_assignment", "ari", "ami", "nmi", "v_measure", "fowlkes_mallows"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the quick start's full run (minutes of clustering) is slow, whoever wrote it."""
    for item in items:
        if "quickstart" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def plugins() -> Plugins:
    return load_plugins()


def blobs(n_per_class: int, n_classes: int, dims: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class blobs around random centres: a deterministic stand-in for features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(n_classes, dims))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = centres[labels] + rng.normal(scale=spread, size=(len(labels), dims))
    order = rng.permutation(len(labels))
    return features[order].astype(np.float32), labels[order]


@pytest.fixture()
def split_blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = blobs(60, 5, 12, seed=0)
    return x[:200], y[:200], x[200:], y[200:]


def run_torchrun(
    *args: str, cwd: Path, port: int, env: dict[str, str] | None = None, processes: int = 2
) -> subprocess.CompletedProcess[str]:
    """``processes`` CPU processes under ``torchrun`` (gloo), running ``args`` (a script, or ``-m module``)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(port),
            *args,
        ],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sslbench`` in a real subprocess (from ``cwd``, so the installed package is used)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sslbench", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def install_wheel_in_fresh_venv(source: Path, work: Path) -> Path:
    """Build the project at ``source`` as a wheel (no network, no build isolation), install it in a new
    virtual environment under ``work`` and return that environment's python.

    The new environment sees this one's packages behind its own (a ``.pth`` file adds this environment's
    site folders, their own ``.pth`` files included): the sslbench under test is this environment's,
    while the wheel's package shadows any copy installed here.
    """
    import shutil
    import site
    import venv

    copy = work / "src"  # built from a copy: a build in place leaves build/ and *.egg-info behind
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    wheel_dir = work / "dist"
    built = subprocess.run(
        [*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", wheel_dir, copy],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheel_dir.glob("*.whl")
    venv.create(work / "venv", with_pip=False)
    python = work / "venv" / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    parents = "".join(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages())
    (Path(purelib) / "_parent_environment.pth").write_text(parents)
    installed = subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--no-index", "--target", purelib, wheel],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    return python

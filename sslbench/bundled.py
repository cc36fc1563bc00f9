"""Data shipped inside the distribution: the ``registry/`` folder, installed as ``sslbench_registry``."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path


def registry_root() -> Path:
    return Path(str(importlib.resources.files("sslbench_registry")))


def bundled_specs() -> dict[str, Path]:
    """Example specs by name (file stem), e.g. ``quickstart``."""
    folder = registry_root() / "specs"
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL in it: the reader says so
        return False


def find_spec(argument: str) -> Path:
    """``argument`` as a path if it exists, else the bundled spec of that name.

    A bare name that is neither is an error suggesting the closest bundled spec (``quickstrat``).
    """
    path = Path(argument)
    if _exists(path) or path.suffix in (".yaml", ".yml") or "/" in argument:
        return path
    bundled = bundled_specs()
    if argument in bundled:
        return bundled[argument]
    if len(argument) > 100 or not re.fullmatch(r"[A-Za-z0-9_.-]+", argument):
        return path  # not a name a bundled spec could have: the reader reports the path
    from sslbench.errors import SSLBenchError, did_you_mean

    raise SSLBenchError(
        f"no spec file '{argument}' and no bundled spec of that name{did_you_mean(argument, bundled)}; "
        f"bundled: {', '.join(bundled)}"
    )

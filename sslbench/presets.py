"""Protocol presets: the published k-means protocols, as data (``sslbench_registry/presets/*.yaml``).

Each preset is a complete set of protocol choices (PCA or not, the k-means algorithm and its
parameters, restarts, the split fitted, seeds, the main score) with the repository, file and commit
of the peer code it follows and what was read there. A spec names presets in ``protocol.preset``; the
fields it gives explicitly override the preset's (:meth:`sslbench.spec.ProtocolSpec.for_preset`).
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sslbench.errors import SSLBenchError

#: The preset a spec that names none runs: the paper's protocol.
DEFAULT_PRESET = "zheltonozhskii2020"


class PeerSource(BaseModel):
    """The code a preset follows, and what was read in it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repository: str = Field(description="GitHub owner/name")
    file: str = Field(description="the file(s) read, comma-separated")
    commit: str = Field(pattern=r"^[0-9a-f]{40}$", description="the commit read")
    read: str = Field(description="the calls and settings found there")


class Preset(BaseModel):
    """One published protocol."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    title: str
    peer: PeerSource
    protocol: dict[str, Any] = Field(description="ProtocolSpec fields this preset sets")
    notes: str = ""


@functools.cache
def presets() -> dict[str, Preset]:
    """Every preset shipped in ``sslbench_registry/presets``, by name (read once)."""
    from sslbench.spec import ProtocolSpec  # the protocol fields a preset may set

    found: dict[str, Preset] = {}
    for path in sorted(files("sslbench_registry").joinpath("presets").iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yaml"):
            continue
        try:
            preset = Preset.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
            ProtocolSpec.model_validate(preset.protocol)
        except (ValidationError, yaml.YAMLError) as exc:  # shipped data: a packaging bug, said in one line
            raise SSLBenchError(f"preset file {path.name}: {str(exc).splitlines()[0]}") from None
        if preset.name != path.name.removesuffix(".yaml"):
            raise SSLBenchError(f"preset file {path.name} names preset '{preset.name}'")
        found[preset.name] = preset
    return found


def preset_names() -> list[str]:
    return list(presets())

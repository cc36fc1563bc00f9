"""The options of the torch engine's PCA and k-means (the ``torch`` backend's ``backend_options``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbench.engine.rows import CHUNK_ROWS
from sslbench.interfaces import NoOptions

#: k-means choices that are the protocol's (one home for every backend), not the torch engine's.
PROTOCOL_KNOBS = ("algorithm", "max_iter", "tol", "n_init")


class TorchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _protocol_knobs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [key for key in PROTOCOL_KNOBS if key in data]
            if moved:
                raise ValueError(f"{moved[0]} is a protocol choice: set protocol.{moved[0]}, not backend_options")
        return data

    init_size: int | None = Field(None, ge=1, description="k-means++ sample size; default 3 × batch size")
    reassignment_ratio: float = Field(0.01, ge=0.0, description="minibatch: re-seed centres below this")
    chunk_rows: int = Field(CHUNK_ROWS, ge=1, description="rows per distance computation")
    prune: bool | None = Field(
        None,
        description="minibatch: skip distance products for rows whose centre provably stays the nearest "
        "(triangle-inequality bounds; same assignments); null = on for the CPU, off on a GPU",
    )
    screen: bool | None = Field(
        None,
        description="nearest centres from bfloat16 products, float32 only for rows they cannot settle (the "
        "same exact labels either way, proven by an error bound); null = on a CPU with native bfloat16, while it "
        "settles most rows (measured as the fit goes: crowded centres leave too many for it to pay)",
    )
    pca_precision: Literal["float32", "float64"] = Field(
        "float32",
        description="arithmetic of each chunk's covariance product (chunks are centred and summed in float64): "
        "float32 (2× faster on CPU; explained variances within 1e-5 relative of scikit-learn's float64 PCA, "
        "benchmarks/clustering_engine.py) or float64",
    )


def torch_options(options: BaseModel) -> TorchOptions:
    """``options`` as the torch engine's: none given (the config's :class:`~sslbench.interfaces.NoOptions`)
    means the defaults; another backend's options object is a caller's bug, not silently the defaults."""
    if isinstance(options, TorchOptions):
        return options
    if type(options) is NoOptions:
        return TorchOptions()
    raise TypeError(f"the torch engine needs TorchOptions, got {type(options).__name__}")

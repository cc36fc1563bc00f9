"""The options of the torch engine's PCA and k-means (the ``torch`` backend's ``backend_options``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sslbench.engine.rows import CHUNK_ROWS


class TorchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    algorithm: Literal["minibatch", "lloyd"] = Field("minibatch", description="minibatch (the paper) or lloyd")
    init_size: int | None = Field(None, ge=1, description="k-means++ sample size; default 3 × batch size")
    reassignment_ratio: float = Field(0.01, ge=0.0, description="minibatch: re-seed centres below this")
    max_iter: int = Field(300, ge=1, description="lloyd: iterations at most")
    tol: float = Field(1e-4, ge=0.0, description="lloyd: stop when centres move less (relative)")
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

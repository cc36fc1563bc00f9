"""The ``torch`` backend: exact PCA and scikit-learn-faithful k-means at GEMM speed, CPU or GPU.

The algorithms live in the engine (:mod:`sslbench.engine`): :class:`~sslbench.engine.pca.TorchPCA`
(PCA from a streamed covariance), :class:`~sslbench.engine.kmeans.TorchKMeans` (mini-batch or Lloyd
k-means with exact nearest centres on the CPU, split across the ranks it is handed) and their options
:class:`~sslbench.engine.options.TorchOptions`. This module registers them as one backend.
"""

from __future__ import annotations

from collections.abc import Callable

from sslbench import hookimpl
from sslbench.engine.kmeans import TorchKMeans
from sslbench.engine.options import TorchOptions
from sslbench.engine.pca import TorchPCA
from sslbench.interfaces import BackendEntry

NAME = "torch"


@hookimpl
def sslbench_register_backends(register: Callable[[BackendEntry], None]) -> None:
    register(
        BackendEntry(
            NAME,
            pca=TorchPCA,
            kmeans=TorchKMeans,
            description="exact PCA from a streamed covariance; scikit-learn-faithful mini-batch k-means "
            "(or Lloyd) by GEMM, CPU/GPU, torch.distributed",
            options=TorchOptions,
            algorithms=("minibatch", "lloyd"),
        )
    )

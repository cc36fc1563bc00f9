"""Run by ``torchrun --nproc_per_node 2``: each rank fits the torch k-means on its shard of the rows."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch.distributed as dist

from sslbench.engine.kmeans import TorchKMeans
from sslbench.interfaces import ClustererConfig
from sslbench.ranks import Ranks


def main(features_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    ranks = Ranks.of_process_group()
    rank, world = ranks.rank, ranks.world
    features = np.load(features_path, mmap_mode="r")
    bounds = np.linspace(0, len(features), world + 1).astype(int)
    shard = features[bounds[rank] : bounds[rank + 1]]
    kmeans = TorchKMeans(ClustererConfig(9, 3, 256, 3, ranks=ranks))
    kmeans.fit(shard)
    if rank == 0:
        labels = kmeans.predict(features)
        with open(out_path, "w") as handle:
            json.dump({"centers": kmeans.centers.tolist(), "labels": labels.tolist()}, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

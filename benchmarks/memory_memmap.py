"""Cluster a memory-mapped 1.28M × 2048 float32 feature file (10.5 GB) with bounded resident memory.

    python benchmarks/memory_memmap.py                    # writes, clusters and deletes the file
    python benchmarks/memory_memmap.py --rows 200000      # a smaller file

The file is written in blocks, then the torch backend fits k-means on it (k = 1000, the paper's
batch size; ``--epochs``, default 1, since the point is memory, not convergence) and predicts every
row. Prints the peak resident set size (target ≤ 3 GB) and the time of each stage. The page cache
may hold the file; that memory is the kernel's, not the process's.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import class_blobs

from sslbench.engine.kmeans import TorchKMeans
from sslbench.interfaces import ClustererConfig
from sslbench.spec import default_kmeans_batch_size


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to write the file (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "features.npy"
        t0 = time.perf_counter()
        # Plain writes, not a writable mapping: dirty mapped pages would count in this process's RSS.
        with open(path, "wb") as handle:
            header = {"descr": "<f4", "fortran_order": False, "shape": (args.rows, args.dims)}
            np.lib.format.write_array_header_2_0(handle, header)
            for start in range(0, args.rows, 32768):
                stop = min(start + 32768, args.rows)
                handle.write(class_blobs(stop - start, args.k, args.dims, seed=start)[0].tobytes())
        write_s = time.perf_counter() - t0
        size_gb = path.stat().st_size / 1024**3
        print(f"wrote {args.rows} × {args.dims} float32 ({size_gb:.1f} GB) in {write_s:.0f} s")
        baseline = peak_rss_gb()

        features = np.load(path, mmap_mode="r")
        kmeans = TorchKMeans(ClustererConfig(args.k, args.epochs, default_kmeans_batch_size(args.k), 0))
        t0 = time.perf_counter()
        kmeans.fit(features)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        labels = kmeans.predict(features)
        predict_s = time.perf_counter() - t0
        print(
            f"k-means fit ({args.epochs} epoch(s), k = {args.k}): {fit_s:.0f} s "
            f"(k-means++ {kmeans.init_s:.0f} s); predict all rows: {predict_s:.0f} s; "
            f"{len(np.unique(labels))} clusters used"
        )
        print(
            f"peak RSS: {peak_rss_gb():.2f} GB (of which {baseline:.2f} GB before clustering, generating the file) "
            f"for a {size_gb:.1f} GB feature file   (target ≤ 3 GB)"
        )


if __name__ == "__main__":
    main()

"""Run by ``torchrun --nproc_per_node 2`` (tests/test_training.py): each rank hands the evaluator's rank
check its own metrics; writes what each rank saw (``ok`` or the error) to OUT/rank<r>.txt."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch.distributed as dist

from sslbench.errors import SSLBenchError
from sslbench.ranks import ONE_PROCESS, Ranks
from sslbench.training import _check_ranks_agree


def main(out: Path, case: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    metrics = {"sslbench/d/acc": 0.5, "sslbench/d/nmi": float("nan")}
    if case == "value" and rank == 1:
        metrics["sslbench/d/acc"] = 0.5 + 2**-40
    if case == "names" and rank == 1:
        metrics["sslbench/d/ari"] = 0.1
    try:
        if case == "alone":  # rank 0 evaluated alone (ranks=ONE_PROCESS): no collective, rank 1 never joins
            if rank == 0:
                _check_ranks_agree({"sslbench/d/acc": 0.25}, ONE_PROCESS)
        else:
            _check_ranks_agree(metrics, Ranks.of_process_group())
        seen = "ok"
    except SSLBenchError as exc:
        seen = str(exc)
    (out / f"rank{rank}.txt").write_text(seen)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

"""The cost of one evaluation inside a training loop, and what fewer k-means epochs, seeds and probes buy.

    python benchmarks/train_loop_eval.py                       # ResNet-18, 2,000 + 1,000 Fashion-MNIST images
    python benchmarks/train_loop_eval.py --train 500 --test 250 --size 32
    python benchmarks/train_loop_eval.py --linear-sweep              # also the linear probe's 45 C values

A torchvision ResNet-18 with random weights (seed 0; its classifier replaced by the identity: 512-d
features; the cost does not depend on the weights) is evaluated on the first ``--train`` Fashion-MNIST
train images and the first ``--test`` test images (the Debian package's IDX files), each converted to RGB
and resized to ``--size`` px by ``sslbench.evaluate.imagenet_eval_transform(resize=size, crop=size)``.

1. One ``sslbench.evaluate_model`` call with the paper's protocol (60 k-means epochs, 5 seeds) and two
   probes (kNN with k = 20; linear at C = 1), split into extraction (from the call to the first event the
   clustering emits), clustering (PCA + k-means + scoring: the runs' ``timings``) and probes (each
   ``ProbeRecord.seconds``).
   The scratch folder is sampled at that first event: what the call wrote to disk (the features; removed
   when the call returns, which is checked).
2. The trade-off: ``evaluate_features`` on the same model's features (extracted once more by a plain
   ``torch.inference_mode`` loop, float32) for k-means epochs 60/20/5 × seeds 5/3/1 without probes
   (time, ACC and NMI mean ± std over seeds), then each probe alone (its seconds and top-1); with
   ``--linear-sweep`` also the linear probe's default sweep of 45 C values (one C took minutes on a loaded
   2-core machine: the sweep is left out unless asked for).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sslbench
from sslbench.evaluate import imagenet_eval_transform
from sslbench.events import Event

DATASET = "fashion_mnist"
#: The probes of the evaluation (each alone in part 3): kNN (k = 20) and the linear probe at one C (what a
#: training loop can afford); LINEAR_SWEEP is the linear probe's default (DINOv2's 45 C values).
PROBES = {"knn": {"id": "knn"}, "linear, C = 1": {"id": "linear", "options": {"c_values": [1.0]}}}
LINEAR_SWEEP = {"linear, 45 C values": {"id": "linear"}}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def shown(summary) -> str:
    """A metric summary in percent: mean ± std over seeds (the mean alone for one seed)."""
    spread = f" ± {100 * summary.std:.2f}" if summary.std is not None else ""
    return f"{100 * summary.mean:.2f}{spread}"


def resnet18() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    return model.eval()


def one_evaluation(model: torch.nn.Module, transform, options: dict, scratch: Path) -> None:
    marks: dict[str, float] = {}
    scratch_bytes: list[int] = []

    def emit(event: Event) -> None:
        if "first" not in marks:
            marks["first"] = time.perf_counter()
            scratch_bytes.append(folder_bytes(scratch))

    started = time.perf_counter()
    results = sslbench.evaluate_model(
        model,
        DATASET,
        dataset_options=options,
        transform=transform,
        epochs=60,
        seeds=5,
        probes=[PROBES["knn"], PROBES["linear, C = 1"]],
        scratch_dir=scratch,
        emit=emit,
    )
    wall = time.perf_counter() - started
    extraction = marks["first"] - started
    pca = max(run.timings.pca_s for run in results.runs)  # fitted once, shared by the runs
    clustering = pca + sum(run.timings.kmeans_s + run.timings.eval_s for run in results.runs)
    probes = {record.probe: record.seconds for record in results.probes}
    other = wall - extraction - clustering - sum(probes.values())
    (row,) = results.summary
    print(f"\n1. one evaluate_model call (60 k-means epochs, 5 seeds, kNN and linear (C = 1) probes): {wall:.1f} s")
    print("| part | seconds | share |")
    print("|---|---:|---:|")
    for part, seconds in (
        ("extraction (train + test)", extraction),
        ("clustering (PCA, k-means × 5 seeds, scoring)", clustering),
        *((f"{name} probe", seconds) for name, seconds in probes.items()),
        ("rest (checks, results)", other),
    ):
        print(f"| {part} | {seconds:.1f} | {100 * seconds / wall:.0f} % |")
    probed = ", ".join(f"{name} {100 * value:.2f}" for r in results.probes for name, value in r.metrics.items())
    print(f"ACC {shown(row.metrics['acc'])}, NMI {shown(row.metrics['nmi'])} (%, mean ± std over seeds); {probed}")
    left = folder_bytes(scratch)
    print(
        f"scratch on disk after extraction: {scratch_bytes[0] / 2**20:.1f} MiB (the two splits' features, float32); "
        f"left after the call: {left} bytes"
    )


def plain_features(model: torch.nn.Module, transform, split) -> np.ndarray:
    rows = []
    with torch.inference_mode():
        for start in range(0, len(split), 256):
            batch = torch.stack([transform(split[i]) for i in range(start, min(start + 256, len(split)))])
            rows.append(model(batch).numpy())
    return np.concatenate(rows)


def trade_off(model: torch.nn.Module, transform, options: dict, probes: dict) -> None:
    data = sslbench.load_plugins().datasets.get(DATASET)
    dataset = data.factory(data.options.model_validate(options))
    train, test = dataset.splits["train"], dataset.splits["test"]
    x_train, x_test = plain_features(model, transform, train), plain_features(model, transform, test)
    common = {"n_classes": dataset.num_classes, "scratch_dir": Path(tempfile.mkdtemp())}
    print("\n2. clustering alone (evaluate_features on the same features, no probes)")
    print("| k-means epochs | seeds | seconds | ACC % | NMI % |")
    print("|---:|---:|---:|---:|---:|")
    for epochs in (60, 20, 5):
        for seeds in (5, 3, 1):
            started = time.perf_counter()
            results = sslbench.evaluate_features(
                x_train, train.labels, x_test, test.labels, epochs=epochs, seeds=seeds, **common
            )
            seconds = time.perf_counter() - started
            (row,) = results.summary
            acc, nmi = row.metrics["acc"], row.metrics["nmi"]
            print(f"| {epochs} | {seeds} | {seconds:.2f} | {shown(acc)} | {shown(nmi)} |", flush=True)
    print("\n3. each probe alone (fitted once, whatever the seeds)")
    print("| probe | seconds | top-1 % |")
    print("|---|---:|---:|")
    for name, probe in probes.items():
        results = sslbench.evaluate_features(
            x_train, train.labels, x_test, test.labels, epochs=5, seeds=1, probes=[probe], **common
        )
        (record,) = results.probes
        values = ", ".join(f"{metric} {100 * value:.2f}" for metric, value in record.metrics.items())
        print(f"| {name} | {record.seconds:.2f} | {values} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help="input side in px (the images are 28 px)")
    parser.add_argument("--linear-sweep", action="store_true", help="also time the linear probe's default C sweep")
    args = parser.parse_args()
    options = {"limit": {"train": args.train, "test": args.test}}
    transform = imagenet_eval_transform(resize=args.size, crop=args.size)
    model = resnet18()
    print(
        f"ResNet-18 (random init), {args.train:,} train + {args.test:,} test Fashion-MNIST images at {args.size} px; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); load average before: {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        one_evaluation(model, transform, options, Path(scratch))
    trade_off(model, transform, options, {**PROBES, **(LINEAR_SWEEP if args.linear_sweep else {})})
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

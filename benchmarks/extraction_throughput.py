"""CPU extraction: `sslbench extract` against a plain float32 NCHW DataLoader loop, per card family.

    python benchmarks/extraction_throughput.py                      # four families, 128 images each
    python benchmarks/extraction_throughput.py --models tf_efficientnet_lite0.offline_in1k --images 512
    python benchmarks/extraction_throughput.py --variants plain,system,sslbench,bf16

Every variant runs in a fresh process (the allocator's settings belong to a process), on the same
Fashion-MNIST test images (28×28, resized by the card's own preprocessing to 224 px; scikit-learn's
digits when Fashion-MNIST is not installed), batch after batch:

- ``plain``: what one writes by hand: a ``DataLoader`` (``--workers`` processes) over the backbone's
  preprocessing and the model's forward under ``torch.inference_mode``, float32, NCHW, the C allocator
  as the system sets it, torch's default threads;
- ``system``: ``extract_split`` as ``sslbench extract`` runs it, but with ``SSLBENCH_MALLOC=system``
  (the allocator alone left out: its share of the speed-up, and its memory);
- ``sslbench``: ``extract_split`` as ``sslbench extract`` runs it: the allocator tuned at start-up as the
  CLI does, the worker/thread pool sized from measured costs, channels-last for convolutional networks,
  features committed to a fresh cache entry;
- ``bf16``: the same with ``extraction.cpu_precision: bfloat16``, where the CPU computes bfloat16
  natively (elsewhere the one-line refusal is printed); its recorded cosine to float32 is shown.

Per variant: images/s, its ratio to ``plain``, user and sys CPU seconds (the process and its decode
workers), peak RSS and the RSS left after the extraction, and images/s as a share of the model's FLOP
bound (forward FLOPs of one image, counted by torch's FlopCounterMode, at the float32 GEMM rate
measured here on every core). Cards without weights on this machine run with random weights (the
speed is the same). Goals (issue 24): ``sslbench`` ≥ 3× ``plain`` for EfficientNet-Lite0, ≥ 1.8× for
ResNet-50 and MobileNetV2, ≥ 1.3× for ViT-S; ``bf16`` ≥ 5× for EfficientNet-Lite0 with cosine ≥ 0.999;
sys < 10 % of user.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = (
    "tf_efficientnet_lite0.offline_in1k",
    "mobilenetv2_100.tv_in1k",
    "resnet50.dino",
    "vit_small_patch16_224.dino",
)
VARIANTS = ("plain", "sslbench", "bf16")


def _images(count: int) -> tuple[str, Any]:
    from sslbench_plugins.datasets import load_digits_dataset
    from sslbench_plugins.image_datasets import DEBIAN_FASHION_MNIST, FashionMNISTOptions, load_fashion_mnist

    if Path(DEBIAN_FASHION_MNIST).is_dir():
        return "Fashion-MNIST test", load_fashion_mnist(FashionMNISTOptions(limit=count)).splits["test"]
    return "scikit-learn digits", load_digits_dataset(None).splits["train"]  # type: ignore[arg-type]


def _backbone(model_id: str) -> tuple[Any, str]:
    """The card's backbone with its weights, or random weights when they are not on this machine."""
    from sslbench.errors import SSLBenchError
    from sslbench.plugins import load_plugins
    from sslbench.weights import no_downloads

    entry = load_plugins().backbones.get(model_id)
    try:
        with no_downloads():
            return entry.factory(entry.options.model_validate({})), "real"
    except SSLBenchError:
        return entry.factory(entry.options.model_validate({"pretrained": False})), "random"


def _cpu_seconds() -> tuple[float, float, int]:
    """User and sys seconds, and minor page faults, of this process and of its children that ended (the
    decode workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime, own.ru_minflt + children.ru_minflt


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process; returns its measurements."""
    if args.child != "plain":  # as the CLI starts: sleeping OpenMP threads, the allocator tuned
        from sslbench.allocator import tune_allocator
        from sslbench.threads import prefer_sleeping_threads

        prefer_sleeping_threads()
        tune_allocator()  # a no-op with SSLBENCH_MALLOC=system
    import torch

    from sslbench_plugins.datasets import ArraySplit

    source, whole = _images(args.images)
    count = min(args.images, len(whole))
    split = ArraySplit(whole.as_array()[:count], whole.labels[:count], as_image=True)
    backbone, weights = _backbone(args.model)
    found: dict[str, Any] = {"images": count, "source": source, "weights": weights}
    with torch.inference_mode():
        from torch.utils.flop_counter import FlopCounterMode

        sample = backbone.preprocess(split[0])[None]
        counter = FlopCounterMode(display=False)
        with counter:
            backbone.embed(sample)
        found["flops"] = counter.get_total_flops()
    gc_rss = _rss_mb()
    user0, sys0, faults0 = _cpu_seconds()
    started = time.perf_counter()
    if args.child == "plain":
        from torch.utils.data import DataLoader, Dataset

        class Images(Dataset[Any]):
            def __len__(self) -> int:
                return count

            def __getitem__(self, index: int) -> Any:
                return backbone.preprocess(split[index])

        loader = DataLoader(Images(), batch_size=args.batch_size, num_workers=args.workers)
        with torch.inference_mode():
            rows = sum(len(backbone.embed(batch)) for batch in loader)
        assert rows == count
    else:
        from sslbench.cache import CacheKey, FeatureCache
        from sslbench.extract import ExtractionSettings, extract_split

        precision = "bfloat16" if args.child == "bf16" else "float32"
        settings = ExtractionSettings(batch_size=args.batch_size, workers=args.workers, precision=precision)
        with tempfile.TemporaryDirectory() as folder:
            key = CacheKey(args.model, {}, {}, {}, "bench", {}, "test", split.fingerprint())
            got = extract_split(
                backbone,
                split,
                settings=settings,
                device="cpu",
                name="bench",
                entry=FeatureCache(Path(folder)).entry(key),
            )
            manifest = json.loads((FeatureCache(Path(folder)).entry(key).path / "manifest.json").read_text())
        found.update(
            memory_format=manifest["memory_format"],
            allocator=manifest["allocator"],
            pool=[manifest["workers"], manifest.get("threads")],
            extract_s=manifest["extract_s"],
        )
        if got.precision_check is not None:
            found["cosine"] = got.precision_check
    wall = time.perf_counter() - started
    user1, sys1, faults1 = _cpu_seconds()
    found.update(
        wall_s=wall,
        user_s=user1 - user0,
        sys_s=sys1 - sys0,
        page_faults=faults1 - faults0,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_before_mb=gc_rss,
        rss_after_mb=_rss_mb(),
    )
    return found


def _run_variant(args: argparse.Namespace, model: str, variant: str) -> dict[str, Any]:
    env = {**os.environ, "SSLBENCH_MALLOC": "system" if variant in ("plain", "system") else "tuned"}
    command = [sys.executable, __file__, "--child", variant, "--model", model]
    command += ["--images", str(args.images), "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last}
    found: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="card ids, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="plain, system, sslbench, bf16")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="as the spec's default")
    parser.add_argument("--child", choices=("plain", "system", "sslbench", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0

    import torch
    from _gemm import gemm_rate

    from sslbench.allocator import glibc_version
    from sslbench.extract import native_bfloat16

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    rate = gemm_rate(2048, 1024, 1024)
    load = os.getloadavg()
    print(
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, glibc {glibc_version()}, "
        f"native bfloat16: {native_bfloat16() or 'none'}; float32 GEMM {rate / 1e9:.1f} GFLOP/s on all cores"
    )
    print(f"batch {args.batch_size}, {args.workers} worker(s) asked, load average {load[0]:.2f} at the start")
    header = (
        f"{'model':36s} {'variant':8s} {'img/s':>7s} {'×plain':>7s} {'user s':>7s} {'sys s':>6s} {'sys/user':>8s} "
        f"{'bound %':>7s} {'peak MB':>7s} {'kept MB':>7s}  notes"
    )
    print(header)
    for model in args.models.split(","):
        plain_rate = None
        for variant in args.variants.split(","):
            got = _run_variant(args, model, variant)
            if "error" in got:
                print(f"{model:36s} {variant:8s} {got['error']}")
                continue
            img_s = got["images"] / got["wall_s"]
            plain_rate = img_s if variant == "plain" else plain_rate
            ratio = f"{img_s / plain_rate:.2f}" if plain_rate else "-"
            bound = 100 * img_s * got["flops"] / rate
            notes = [f"{got['weights']} weights", f"{got['images']} {got['source']} images"]
            notes.append(
                f"{got['flops'] / 1e9:.2f} GFLOP/img, {got['page_faults'] / got['images']:.0f} page faults/img"
            )
            if "memory_format" in got:
                notes += [got["memory_format"], f"allocator {got['allocator']}", f"pool {got['pool']}"]
            if "cosine" in got:
                check = got["cosine"]
                notes.append(f"cosine to fp32 mean {check['mean_cosine']:.6f} min {check['min_cosine']:.6f}")
            print(
                f"{model:36s} {variant:8s} {img_s:7.1f} {ratio:>7s} {got['user_s']:7.1f} {got['sys_s']:6.1f} "
                f"{100 * got['sys_s'] / max(got['user_s'], 1e-9):7.1f}% {bound:6.1f}% "
                f"{got['peak_rss_mb']:7.0f} {got['rss_after_mb'] - got['rss_before_mb']:7.0f}  {', '.join(notes)}",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.2f} at the end; GFLOP/img: FlopCounterMode of one forward")
    return 0


if __name__ == "__main__":
    sys.exit(main())

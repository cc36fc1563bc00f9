"""GPU check of the extraction path on the paper's architectures: AMP (float16 autocast) + channels_last
against float32, and throughput, one call.

    python benchmarks/gpu_extraction.py                       # on a CUDA GPU
    python benchmarks/gpu_extraction.py --device cpu --size 64 --batch 4 --models resnet50.swav_800ep

For each model (random initialisation: the check is about arithmetic and speed, not weights): the
backbone is prepared exactly as extraction prepares it (``prepare_backbone``, ``_forward``), features of
the same random batch are computed with AMP and in float32, and the script prints the relative error
‖amp − fp32‖ / ‖fp32‖, the cosine of the worst row, and images per second of each (median of timed
batches after warm-up). Exits non-zero when the device is not visible.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

DEFAULT_MODELS = (
    "resnet50.swav_800ep",
    "resnet50_1x_sk0.simclrv2",
    "resnet152_1x_sk1.simclrv2",
    "resnet152_3x_sk1.simclrv2",
    "resnext101_32x48d.fb_wsl_ig1b_ft_in1k",
)


def main() -> int:
    import torch

    from sslbench.extract import ExtractionSettings, _forward, prepare_backbone
    from sslbench.plugins import load_plugins

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    plugins = load_plugins()
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(args.batch, 3, args.size, args.size, generator=generator)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    print(f"{'model':40s} {'dim':>6s} {'rel.err':>9s} {'min cos':>8s} {'fp32 img/s':>11s} {'amp img/s':>10s}")
    for model_id in args.models.split(","):
        entry = plugins.backbones.get(model_id)
        started = time.perf_counter()
        backbone = prepare_backbone(entry.factory(entry.options.model_validate({"pretrained": False})), args.device)
        build_s = time.perf_counter() - started
        outputs, rates = {}, {}
        for amp in (False, True):
            _forward(backbone, batch, args.device, ExtractionSettings(amp=amp))  # warm-up: cuDNN autotuning
            times = []
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                outputs[amp] = _forward(backbone, batch, args.device, ExtractionSettings(amp=amp))
                times.append(time.perf_counter() - t0)
            rates[amp] = args.batch / float(np.median(times))
        ref, low = outputs[False].astype(np.float64), outputs[True].astype(np.float64)
        rel = np.linalg.norm(low - ref) / np.linalg.norm(ref)
        cos = (ref * low).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(low, axis=1))
        finite = bool(np.isfinite(low).all())
        print(
            f"{model_id:40s} {ref.shape[1]:6d} {rel:9.2e} {cos.min():8.5f} {rates[False]:11.0f} {rates[True]:10.0f}"
            f"{'' if finite else '  NON-FINITE AMP FEATURES'}  (built in {build_s:.0f} s)"
        )
        del backbone
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

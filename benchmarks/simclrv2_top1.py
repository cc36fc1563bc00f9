"""Check a SimCLRv2 conversion on the real checkpoint: top-1 of its ``head_supervised`` on ImageNet val.

    python benchmarks/simclrv2_top1.py --model resnet152_1x_sk1.simclrv2 --val /data/imagenet/val
    python benchmarks/simclrv2_top1.py --model resnet50_1x_sk0.simclrv2 --val DIR --weights CKPT_PREFIX

Needs the TF checkpoint (downloaded into the torch.hub cache on first use, or ``--weights``) and
ImageNet val sorted into ``<wnid>/`` folders (``sslbench prepare-imagenet-val``): the head's classes
are in sorted-wnid order, as the folders are. ``--per-class`` images of every class (default 5, 5,000
images) give the top-1 within about ±0.6 points of the full val set; the published linear top-1 is
printed beside it. A conversion with a wrong layer order, padding or preprocessing lands tens of
points low; the script exits 1 when top-1 is more than ``--tolerance`` points under the card's value.
No test runs this (it needs the real files); tests check the reader and module on written bundles.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> int:
    import torch

    from sslbench.errors import SSLBenchError
    from sslbench.plugins import load_plugins

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50_1x_sk0.simclrv2")
    parser.add_argument("--val", required=True, help="ImageNet val folder with one sub-folder per wnid")
    parser.add_argument("--weights", help="TF checkpoint prefix, .index file or folder (default: the card's)")
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--tolerance", type=float, default=2.0, help="points under the published top-1 allowed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    plugins = load_plugins()
    try:
        entry = plugins.backbones.get(args.model)
        backbone = entry.factory(entry.options.model_validate({"weights": args.weights}))
        imagefolder = plugins.datasets.get("imagefolder")
        dataset = imagefolder.factory(imagefolder.options.model_validate({"root": args.val, "splits": {"val": "."}}))
    except SSLBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    split = dataset.splits["val"]
    if len(dataset.classes) != 1000:
        print(f"error: {args.val} has {len(dataset.classes)} class folders, expected ImageNet's 1000", file=sys.stderr)
        return 2
    labels = split.labels
    chosen = np.concatenate([np.flatnonzero(labels == c)[: args.per_class] for c in range(1000)])
    backbone.to(args.device)
    correct1 = correct5 = 0
    with torch.inference_mode():
        for start in range(0, len(chosen), args.batch_size):
            batch = chosen[start : start + args.batch_size]
            pixels = torch.stack([backbone.preprocess(split[int(i)]) for i in batch]).to(args.device)
            top5 = backbone.logits(pixels).topk(5, dim=1).indices.cpu().numpy()
            truth = labels[batch]
            correct1 += int((top5[:, 0] == truth).sum())
            correct5 += int((top5 == truth[:, None]).any(axis=1).sum())
    top1, top5_acc = 100 * correct1 / len(chosen), 100 * correct5 / len(chosen)
    published = entry.card.linear_top1.value if entry.card and entry.card.linear_top1 else float("nan")
    print(
        f"{args.model}: top-1 {top1:.2f} / top-5 {top5_acc:.2f} on {len(chosen)} val images "
        f"(published linear top-1 {published:.1f}; difference {top1 - published:+.2f})"
    )
    return 0 if top1 >= published - args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())

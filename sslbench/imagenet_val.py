"""Sorting the flat ILSVRC2012 validation folder into the ``val/<wnid>/`` layout ``imagefolder`` reads."""

from __future__ import annotations

import os
from pathlib import Path

from sslbench.errors import SSLBenchError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def prepare_imagenet_val(val_dir: Path, labels_file: Path, synsets: Path | None, link: bool) -> int:
    """Sort the flat ILSVRC2012 val folder into ``val/<wnid>/`` class folders.

    ``labels_file`` is either LOC_val_solution.csv (``ImageId,PredictionString`` with the wnid
    first), a text file of ``<file name> <wnid>`` lines, or ILSVRC2012_validation_ground_truth.txt
    (one 1-based ILSVRC2012_ID per image, in file-name order) together with ``synsets``: the wnids
    in ILSVRC2012_ID order, one per line (from the devkit's meta.mat). Images are moved, or
    symlinked with ``link``. Returns the number of images placed.
    """
    if not val_dir.is_dir():
        raise SSLBenchError(f"val folder not found: {val_dir}")
    if not labels_file.is_file():
        raise SSLBenchError(f"labels file not found: {labels_file}")
    lines = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    wnid_of: dict[str, str] = {}
    if lines and lines[0].lower().startswith("imageid"):
        for line in lines[1:]:
            image_id, prediction = line.split(",", 1)
            wnid_of[image_id] = prediction.split()[0]
    elif lines and lines[0].isdigit():
        if synsets is None:
            raise SSLBenchError(f"{labels_file} holds ILSVRC2012 class ids: give --synsets, the wnids in id order")
        ids = [line.strip() for line in synsets.read_text().splitlines() if line.strip()]
        images = sorted(p.stem for p in val_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if len(images) != len(lines):
            raise SSLBenchError(f"{val_dir} has {len(images)} images but {labels_file} has {len(lines)} labels")
        for image, label in zip(images, lines, strict=True):
            wnid_of[image] = ids[int(label) - 1].split()[0]
    else:
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 2:
                raise SSLBenchError(f"{labels_file}:{number}: expected '<file name> <wnid>'")
            wnid_of[Path(parts[0]).stem] = parts[1]
    placed = 0
    for path in sorted(val_dir.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        wnid = wnid_of.get(path.stem)
        if wnid is None:
            raise SSLBenchError(f"{path.name} has no label in {labels_file}")
        target = val_dir / wnid / path.name
        target.parent.mkdir(exist_ok=True)
        if link:
            target.symlink_to(path.resolve())
        else:
            os.replace(path, target)
        placed += 1
    return placed

"""A Hugging Face hub cache written by hand, in the folder layout huggingface_hub documents and reads
(``models--<owner>--<name>/{blobs,snapshots,refs}``), without calling huggingface_hub: what it finds
there is then an independent check of how sslbench and huggingface_hub look files up."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: The commit every snapshot written here claims to be.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hf_file(cache: Path, repo_id: str, filename: str, data: bytes, blob_name: str | None = None) -> Path:
    """``data`` as ``filename`` of ``repo_id``: the bytes in ``blobs/<sha256>`` (an LFS file's etag is its
    sha256; ``blob_name`` overrides it to imitate a damaged file), a relative symlink to it in
    ``snapshots/<COMMIT>/``, and ``refs/main`` holding the commit. Returns the snapshot path."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / (blob_name or hashlib.sha256(data).hexdigest())
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots" / COMMIT / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if snapshot.is_symlink():
        snapshot.unlink()
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def write_hf_cache(cache: Path, repo_id: str, state: dict) -> Path:
    """``state`` (name → tensor) as ``model.safetensors`` of ``repo_id``, as timm's mirror holds a model."""
    from safetensors.torch import save

    return write_hf_file(cache, repo_id, "model.safetensors", save({k: v.contiguous() for k, v in state.items()}))

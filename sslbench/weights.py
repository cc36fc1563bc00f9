"""Getting a card's weights into its architecture, strictly.

The file comes from the spec (``options.weights``) or the card's sources in order: a package that
ships it, the torch.hub checkpoint cache, a download with a progress bar into that cache (verified
against the card's hash), or instructions for files only obtainable by hand. It is read with
``torch.load(weights_only=True)`` (or safetensors), reshaped by the card's layout, and loaded so
that the missing and unexpected keys must equal the card's allow-lists exactly: a backbone that
silently loaded nothing (the ``strict=False`` failure) is an error listing the offending keys.

A file's digests are computed in one read and remembered in ``digests.json`` beside the feature
cache, keyed by the file's path, size and modification time, so a run whose weights did not change
hashes nothing (see :func:`file_digests`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from sslbench.cards import Layout, ModelCard, WeightsHash, WeightSource
from sslbench.errors import SSLBenchError


def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint folder, found as torch.hub finds it but without importing torch (a
    listing command should not pay seconds for it) unless torch is already loaded (it may have been
    redirected with ``torch.hub.set_dir``)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return Path(torch.hub.get_dir()) / "checkpoints"
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch"
    )
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def _from_package(source: WeightSource) -> Path:
    assert source.package is not None
    module_name, _, attribute = source.package.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError:
        raise SSLBenchError(f"weights package '{module_name}' is not installed") from None
    for part in attribute.split("."):
        target = getattr(target, part)
    path = Path(target() if callable(target) else target)
    return path / source.file_name if source.file_name and path.is_dir() else path


def _from_timm(source: WeightSource) -> Path:
    import timm

    assert source.timm_name is not None
    cfg = timm.models.get_pretrained_cfg(source.timm_name)
    if cfg is None:
        raise SSLBenchError(f"timm has no pretrained weights named {source.timm_name}")
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        try:
            from huggingface_hub.errors import EntryNotFoundError
        except ImportError:  # huggingface_hub < 0.23 kept its errors in utils
            from huggingface_hub.utils import EntryNotFoundError
        _require_downloads(f"{source.timm_name} from the Hugging Face hub ({cfg.hf_hub_id})")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                return Path(hf_hub_download(cfg.hf_hub_id, filename))
            except EntryNotFoundError:  # the repository holds the other file name
                continue
            except OSError as exc:  # network and disk errors (requests' errors are OSErrors)
                raise SSLBenchError(
                    f"cannot download {source.timm_name} from the Hugging Face hub ({cfg.hf_hub_id}): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from None
        raise SSLBenchError(
            f"the Hugging Face hub repository {cfg.hf_hub_id} holds no weights file of {source.timm_name}"
        )
    url = cfg.url if isinstance(cfg.url, str) else None
    if url:
        return download(url, url.rsplit("/", 1)[-1])
    raise SSLBenchError(f"timm's {source.timm_name} has no download location")


#: Whether weights may be fetched from the network now. The runner turns it off while it builds an
#: optional model: an optional model whose weights are absent is skipped, never downloaded unannounced.
downloads_allowed: ContextVar[bool] = ContextVar("sslbench_downloads_allowed", default=True)


@contextmanager
def no_downloads() -> Iterator[None]:
    """Within the block, a weights file that is not on this machine is an error saying how to get it."""
    token = downloads_allowed.set(False)
    try:
        yield
    finally:
        downloads_allowed.reset(token)


def _require_downloads(what: str) -> None:
    if not downloads_allowed.get():
        raise SSLBenchError(f"{what} is not on this machine and optional models are never downloaded")


def download(url: str, file_name: str) -> Path:
    """``url`` into the torch.hub checkpoint folder as ``file_name`` (kept if already there)."""
    import torch

    target = hub_checkpoint_dir() / file_name
    if target.is_file():
        return target
    _require_downloads(f"{file_name} (from {url}; to get it: download it into {target.parent})")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise SSLBenchError(f"cannot download {url}: {type(exc).__name__}: {exc}") from None
    return target


def cached_path(card: ModelCard) -> Path | None:
    """Where the weights already are on this machine, without downloading anything."""
    for source in card.weights:
        try:
            if source.kind == "package":
                return _from_package(source)
            if source.kind == "file" and Path(source.path or "").expanduser().is_file():
                return Path(source.path or "").expanduser()
            if source.kind == "url":
                name = source.file_name or (source.url or "").rsplit("/", 1)[-1]
                if (hub_checkpoint_dir() / name).is_file():
                    return hub_checkpoint_dir() / name
        except SSLBenchError:
            continue
    return None


def resolve_weights(card: ModelCard, override: str | None = None) -> Path:
    """The weights file of ``card``: the override, a cached copy, or a download."""
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            raise SSLBenchError(f"weights file for {card.id} not found: {path}")
        return path
    cached = cached_path(card)
    if cached is not None:
        return cached
    manual = []
    for source in card.weights:
        if source.kind == "url":
            assert source.url is not None
            return download(source.url, source.file_name or source.url.rsplit("/", 1)[-1])
        if source.kind == "timm":
            return _from_timm(source)
        if source.kind == "manual":
            manual.append(f"{source.instructions}, then give its path as the model's `weights` option")
        if source.kind == "file":
            manual.append(f"the card's file {source.path} does not exist")
    raise SSLBenchError(f"weights of {card.id} are not on this machine: {'; '.join(manual)}")


# --------------------------------------------------------------------------------------------------
# Digests: one read per file computes every digest asked for, remembered across runs

#: What a digest cache entry may hold, with the hex length that tells a sound value from a damaged one.
DIGEST_KINDS: dict[str, int] = {"sha256": 64, "md5": 32}
DIGEST_CACHE_VERSION = 1
_BLOCK = 1 << 20


def digest_kind(kind: str) -> str:
    """The hash algorithm behind a card's hash kind (``md5-prefix`` → ``md5``, ``sha256-prefix`` → ``sha256``)."""
    return "md5" if kind.startswith("md5") else "sha256"


def digest_cache_path() -> Path:
    """``digests.json`` beside the default feature-cache folder (so it follows ``$SSLBENCH_CACHE``)."""
    from sslbench.cache import default_cache_root  # here: plugins import this module at start-up

    return default_cache_root().parent / "digests.json"


def hash_file(path: Path, kinds: Iterable[str] = ("sha256",)) -> dict[str, str]:
    """Hex digests of the file's bytes, every kind of ``kinds`` (see :data:`DIGEST_KINDS`) from one read.

    The only function here that reads a file to hash it: :func:`file_digests` calls it only for what
    its cache lacks, so counting calls to this function counts the weights files hashed.
    """
    # md5 identifies a file here, it protects nothing: usedforsecurity=False keeps it usable on FIPS builds.
    hashers = {kind: hashlib.new(kind, usedforsecurity=False) for kind in dict.fromkeys(kinds)}
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            for hasher in hashers.values():
                hasher.update(block)
    return {kind: hasher.hexdigest() for kind, hasher in hashers.items()}


def _read_digest_cache(path: Path) -> dict[str, Any]:
    """The cache's entries by resolved path; a missing, unreadable or damaged file counts as empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8: the file is rebuilt
        return {}
    if not isinstance(data, dict) or data.get("version") != DIGEST_CACHE_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _cached_digests(entry: Any, stat: os.stat_result) -> dict[str, str]:
    """The digests an entry holds if it describes the file as it is now (same size and mtime), else none."""
    if not isinstance(entry, dict) or entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
        return {}
    return {
        kind: value
        for kind, length in DIGEST_KINDS.items()
        if isinstance(value := entry.get(kind), str)
        and len(value) == length
        and all(c in "0123456789abcdef" for c in value)
    }


def file_digests(path: Path, kinds: Iterable[str] = ("sha256",)) -> dict[str, str]:
    """Digests of ``path`` (``sha256``, ``md5``; card hash kinds are accepted too), hashing it at most once.

    Digests are remembered in :func:`digest_cache_path` under the file's resolved path, its size and
    its modification time in nanoseconds: an entry is used only while both still match, so a file
    rewritten or replaced is hashed again. Only the kinds the entry lacks are computed, all in one read.
    The cache is a convenience: when it cannot be read or written the file is simply hashed.
    """
    wanted = list(dict.fromkeys(digest_kind(kind) for kind in kinds))
    resolved = path.resolve()
    before = resolved.stat()
    cache_path = digest_cache_path()
    key = str(resolved)
    known = _cached_digests(_read_digest_cache(cache_path).get(key), before)
    missing = [kind for kind in wanted if kind not in known]
    if missing:
        known |= hash_file(resolved, missing)
        after = resolved.stat()
        # A file that changed while it was read has no single digest worth remembering.
        if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
            # Re-read just before writing so that entries other processes added meanwhile are kept.
            files = _read_digest_cache(cache_path)
            files[key] = {"size": before.st_size, "mtime_ns": before.st_mtime_ns, **known}
            # A read-only or full disk costs a re-hash next time, not the run.
            with contextlib.suppress(OSError):
                from sslbench.results import write_atomic

                write_atomic(cache_path, json.dumps({"version": DIGEST_CACHE_VERSION, "files": files}, indent=1))
    return {kind: known[kind] for kind in wanted}


def file_digest(path: Path, kind: str = "sha256") -> str:
    """One digest of ``path`` (see :func:`file_digests`)."""
    return file_digests(path, (kind,))[digest_kind(kind)]


def verify_hash(path: Path, expected: WeightsHash, card_id: str) -> str:
    """Check the file against the card; returns its full sha256 (part of the cache key).

    Both digests a card may need come from one read of the file, or from the digest cache.
    """
    checked = expected.kind != "none" and bool(expected.value)
    kind = digest_kind(expected.kind)
    digests = file_digests(path, ("sha256", kind) if checked else ("sha256",))
    sha256 = digests["sha256"]
    if not checked or expected.value is None:
        return sha256
    actual = digests[kind]
    ok = actual == expected.value if expected.kind == "sha256" else actual.startswith(expected.value)
    if not ok:
        raise SSLBenchError(
            f"weights file {path} does not match {card_id}'s {expected.kind} {expected.value} "
            f"(got {actual[: max(len(expected.value), 12)]}): a different or corrupted file"
        )
    return sha256


def read_checkpoint(path: Path) -> Mapping[str, Any]:
    """The file's top-level dict, read without unpickling arbitrary objects."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for truncated or foreign files
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SSLBenchError(f"cannot read checkpoint {path}: {message[:300]}") from None
    if not isinstance(loaded, Mapping):
        raise SSLBenchError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def apply_layout(checkpoint: Mapping[str, Any], layout: Layout, where: str) -> dict[str, Any]:
    """Select, strip and drop keys as the card's layout says."""
    state: Any = checkpoint
    if layout.top_level_key is not None:
        if layout.top_level_key not in checkpoint:
            raise SSLBenchError(
                f"{where}: no '{layout.top_level_key}' entry at the top of the checkpoint "
                f"(it has: {', '.join(sorted(map(str, checkpoint))[:10])})"
            )
        state = checkpoint[layout.top_level_key]
    if not isinstance(state, Mapping):
        raise SSLBenchError(f"{where}: the checkpoint's weights are not a mapping of tensors")
    out: dict[str, Any] = {}
    for key, value in state.items():
        if layout.keep_prefixes is not None and not any(key.startswith(p) for p in layout.keep_prefixes):
            continue
        for prefix in layout.strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in layout.drop):
            continue
        out[key] = value
    return out


def _by_position(model_state: Mapping[str, Any], state: Mapping[str, Any], where: str) -> dict[str, Any]:
    model_keys, file_keys = list(model_state), list(state)
    if len(model_keys) != len(file_keys):
        raise SSLBenchError(
            f"{where}: positional mapping needs equal key counts: model {len(model_keys)}, file {len(file_keys)}"
        )
    mapped = {}
    for model_key, file_key in zip(model_keys, file_keys, strict=True):
        kind_model, kind_file = model_key.rsplit(".", 1)[-1], file_key.rsplit(".", 1)[-1]
        shape_model, shape_file = tuple(model_state[model_key].shape), tuple(state[file_key].shape)
        if kind_model != kind_file or shape_model != shape_file:
            raise SSLBenchError(
                f"{where}: positional mapping fails at {file_key} {shape_file} → {model_key} {shape_model}"
            )
        mapped[model_key] = state[file_key]
    return mapped


def load_state(model: Any, state: Mapping[str, Any], layout: Layout, where: str) -> None:
    """Load ``state`` into ``model``; missing and unexpected keys must be the allowed ones exactly."""
    model_state = model.state_dict()
    if layout.match == "by_position":
        state = _by_position(model_state, state, where)
    for key, value in state.items():
        if key in model_state and tuple(model_state[key].shape) != tuple(value.shape):
            raise SSLBenchError(
                f"{where}: {key} has shape {tuple(value.shape)} in the file but "
                f"{tuple(model_state[key].shape)} in the model (a different architecture?)"
            )
    result = model.load_state_dict(dict(state), strict=False)
    missing = set(result.missing_keys) - set(layout.allowed_missing)
    unexpected = set(result.unexpected_keys) - set(layout.allowed_unexpected)
    absent_allowed = set(layout.allowed_missing) - set(result.missing_keys)
    problems = []
    if missing:
        problems.append(f"{len(missing)} model keys missing from the file: {', '.join(sorted(missing)[:8])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected file keys: {', '.join(sorted(unexpected)[:8])}")
    if absent_allowed:
        problems.append(f"keys the card expects missing are present: {', '.join(sorted(absent_allowed)[:8])}")
    if problems:
        raise SSLBenchError(f"{where}: weights do not fit the architecture: {'; '.join(problems)}")

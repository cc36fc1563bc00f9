"""Getting a card's weights into its architecture, strictly.

The file comes from the spec (``options.weights``), else from the card's sources: first every source
whose file is already on this machine (a local file, a package that ships it, torch.hub's checkpoint
cache, the Hugging Face cache, looked at on disk only), then the downloads in the card's order (a URL
into torch.hub's cache with a progress bar, a Hugging Face file into its cache), else instructions for
files only obtainable by hand. Each source may carry its own layout and hash (timm's Hugging Face mirror
of a model is a conversion: other keys, other bytes); a file from the Hugging Face cache is also checked
against its blob name, the sha256 the hub gave it. It is read with ``torch.load(weights_only=True)`` (or
safetensors), reshaped by the layout, and loaded so that the missing and unexpected keys must equal the
layout's allow-lists exactly: a backbone that silently loaded nothing (the ``strict=False`` failure) is an
error listing the offending keys. A file that is here but unusable raises :class:`BadWeightsFile`.

A file's digests are computed in one read and remembered in ``digests.json`` beside the feature
cache, keyed by the file's path, size and modification time, so a run whose weights did not change
hashes nothing (see :func:`file_digests`), and ``sslbench models`` tells a verified file from one not
yet hashed or one that failed (see :func:`weights_status`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sslbench.cards import Layout, ModelCard, WeightsHash, WeightSource
from sslbench.errors import SSLBenchError, exception_line


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


#: The loader of the cards whose files :func:`resolve_weights` finds (the ``pytorch_zoo`` plugin's);
#: cards of other loaders (TF checkpoints, TF-Hub modules) name files their loader finds itself.
CARD_LOADER = "pytorch"


class BadWeightsFile(SSLBenchError):
    """A weights file that is on this machine but unusable: it fails its hash, cannot be read, or does
    not fit the architecture. Unlike an absent file, it stops even an optional model (never a skip)."""


@dataclass(frozen=True)
class LocalWeights:
    """A weights file on this machine, with what reads and checks it.

    ``expected`` is the digest pinned for this file (the source's own hash, else the card's, never the
    card's for a ``hf`` mirror); ``blob_sha256`` is the name the Hugging Face cache gives the file's bytes
    (an LFS blob is named by its sha256), a second, independent check of a file from that cache.
    """

    path: Path
    where: str
    layout: Layout
    expected: WeightsHash
    blob_sha256: str | None = None

    def checkable(self) -> bool:
        return self.blob_sha256 is not None or _pinned(self.expected)


def _pinned(expected: WeightsHash) -> bool:
    return expected.kind != "none" and bool(expected.value)


def _from_package(source: WeightSource) -> Path:
    assert source.package is not None
    module_name, _, attribute = source.package.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError:
        raise SSLBenchError(f"weights package '{module_name}' is not installed") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SSLBenchError(f"weights package '{module_name}' has no {attribute} (card source {source.package})")
        target = getattr(target, part)
    path = Path(target() if callable(target) else target)
    return path / source.file_name if source.file_name and path.is_dir() else path


def hf_candidates(cfg: Any) -> tuple[str, str | None, list[str]]:
    """timm's pretrained config ``cfg``: its hub repository, revision and the file names timm tries, in
    timm's order (safetensors first)."""
    repo_id, _, revision = str(cfg.hf_hub_id).partition("@")
    filename = cfg.hf_hub_filename or "pytorch_model.bin"
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    names = [safe.get(filename, filename[:-4] + ".safetensors" if filename.endswith(".bin") else filename)]
    if filename not in names:
        names.append(filename)
    return repo_id, revision or None, names


def hf_errors() -> tuple[type[Exception], type[Exception]]:
    """huggingface_hub's (EntryNotFoundError, LocalEntryNotFoundError), wherever its version keeps them."""
    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23 kept its errors in utils
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    return EntryNotFoundError, LocalEntryNotFoundError


def _timm_cfg(source: WeightSource) -> Any:
    import timm

    assert source.timm_name is not None
    try:
        cfg = timm.models.get_pretrained_cfg(source.timm_name)
    except RuntimeError:  # timm's answer to an unknown tag
        cfg = None
    if cfg is None:
        raise SSLBenchError(f"timm has no pretrained weights named {source.timm_name}")
    return cfg


def _hf_files(source: WeightSource) -> tuple[str, str | None, list[str]] | None:
    """The Hugging Face repository, revision and candidate file names of an ``hf`` or ``timm`` source."""
    if source.kind == "hf":
        assert source.repo is not None
        names = [source.file_name] if source.file_name else ["model.safetensors", "pytorch_model.bin"]
        return source.repo, source.revision, names
    if source.kind == "timm":
        cfg = _timm_cfg(source)
        return hf_candidates(cfg) if cfg.hf_hub_id else None
    return None


def _timm_url(source: WeightSource) -> str | None:
    """The URL of a ``timm`` source whose pretrained config names no Hugging Face repository."""
    if source.kind != "timm":
        return None
    cfg = _timm_cfg(source)
    return cfg.url if not cfg.hf_hub_id and isinstance(cfg.url, str) and cfg.url else None


#: How a file found in the Hugging Face cache is described in :attr:`LocalWeights.where` and messages.
HF_CACHE = "Hugging Face cache"


def hf_cached_file(repo: str, revision: str | None, names: Iterable[str]) -> Path | None:
    """The first of ``names`` of ``repo`` in the Hugging Face cache (``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``), found by ``huggingface_hub.try_to_load_from_cache``: the filesystem only, no network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # no huggingface_hub: nothing can have filled its cache through it
        return None
    for name in names:
        found = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def hf_blob_sha256(path: Path) -> str | None:
    """The sha256 the Hugging Face cache names the file's bytes by: a snapshot entry
    (``snapshots/<commit>/<file>``) links to ``blobs/<etag>``, and the etag of an LFS file (every weights
    file) is its sha256. None for a file not laid out so (a copied cache without links, a git-stored file)."""
    blob = path.resolve()
    in_layout = path.is_symlink() and path.parent.parent.name == "snapshots" and blob.parent.name == "blobs"
    if in_layout and len(blob.name) == 64 and all(c in "0123456789abcdef" for c in blob.name):
        return blob.name
    return None


def _top_module(source: WeightSource) -> str:
    """The importable top-level module of a ``package`` source (what the user installs)."""
    return str(source.package).partition(":")[0].split(".")[0]


def _why_no_package_file(source: WeightSource) -> str:
    try:
        path = _from_package(source)
    except SSLBenchError as exc:
        return str(exc)
    return f"package {_top_module(source)} names {path}, which is not a file"


def _url_file_name(source: WeightSource) -> str:
    assert source.url is not None
    return source.file_name or source.url.rsplit("/", 1)[-1]


def _local_file(source: WeightSource) -> tuple[Path, str] | None:
    """Where ``source``'s file already is on this machine (and how to say where), looking only at disk."""
    if source.kind == "package":
        path = _from_package(source)
        return (path, f"package {_top_module(source)}") if path.is_file() else None
    if source.kind == "file":
        path = Path(source.path or "").expanduser()
        return (path, "file") if path.is_file() else None
    if source.kind == "url":
        target = hub_checkpoint_dir() / _url_file_name(source)
        return (target, "torch.hub cache") if target.is_file() else None
    if source.kind in ("hf", "timm"):
        files = _hf_files(source)
        if files is None:  # a timm file downloaded from a URL, into torch.hub's cache
            url = _timm_url(source)
            if url is None:
                return None
            target = hub_checkpoint_dir() / url.rsplit("/", 1)[-1]
            return (target, "torch.hub cache") if target.is_file() else None
        found = hf_cached_file(*files)
        return (found, f"{HF_CACHE} {files[0]}") if found is not None else None
    return None


def _local(card: ModelCard, source: WeightSource, path: Path, where: str) -> LocalWeights:
    expected = source.hash or (WeightsHash(kind="none") if source.kind == "hf" else card.hash)
    blob = hf_blob_sha256(path) if source.kind in ("hf", "timm") else None
    return LocalWeights(path, where, source.layout or card.layout, expected, blob)


def local_weights(card: ModelCard) -> LocalWeights | None:
    """The first of the card's sources whose file is on this machine, without downloading anything."""
    for source in card.weights:
        try:
            found = _local_file(source)
        except SSLBenchError:  # e.g. the package is not installed: that source has nothing here
            continue
        if found is not None:
            return _local(card, source, *found)
    return None


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


def hf_download(repo: str, revision: str | None, names: list[str], who: str = "") -> Path:
    """The first of ``names`` that ``repo`` holds, downloaded into the Hugging Face cache (which the caller
    looked at first, with :func:`hf_cached_file`); errors start with ``who`` and say how to fill the cache
    by hand."""
    head = f"{who}: " if who else ""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise SSLBenchError(f"{head}downloading {repo} needs huggingface_hub (pip install huggingface_hub)") from None
    cache = constants.HF_HUB_CACHE

    def absent(why: str) -> SSLBenchError:
        return SSLBenchError(
            f"{head}{repo} ({' or '.join(names)}) is not in the Hugging Face cache {cache} and {why}; fill it on a "
            f"machine with network (`hf download {repo}`, or `huggingface-cli download {repo}` with an older "
            f"huggingface_hub) and copy its models--{repo.replace('/', '--')} folder into that cache (or point "
            "HF_HUB_CACHE / HF_HOME at a copy)"
        )

    if not downloads_allowed.get():
        raise absent("optional models are never downloaded")
    if constants.HF_HUB_OFFLINE:
        raise absent("HF_HUB_OFFLINE is set")
    entry_not_found, local_not_found = hf_errors()
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, revision=revision))
        except local_not_found as exc:  # no connection (and not cached): before its base class below
            raise absent(f"cannot be downloaded ({exception_line(exc)})") from None
        except entry_not_found:  # the repository holds another of the names
            continue
        except OSError as exc:  # network, HTTP and disk errors of the hub client are OSErrors
            raise SSLBenchError(f"{head}cannot download {repo}: {exception_line(exc)}") from None
    raise SSLBenchError(f"{head}the Hugging Face hub repository {repo} holds none of {', '.join(names)}")


def _fetch(source: WeightSource) -> tuple[Path, str] | None:
    """``source``'s file downloaded (None for sources nothing can download)."""
    if source.kind == "url":
        assert source.url is not None
        return download(source.url, _url_file_name(source)), "torch.hub cache"
    if source.kind in ("hf", "timm"):
        files = _hf_files(source)
        if files is not None:
            return hf_download(files[0], files[1], files[2]), f"{HF_CACHE} {files[0]}"
        url = _timm_url(source)
        if url is None:
            raise SSLBenchError(f"timm's {source.timm_name} has no download location")
        return download(url, url.rsplit("/", 1)[-1]), "torch.hub cache"
    return None


def resolve_weights(card: ModelCard, override: str | None = None) -> LocalWeights:
    """The weights file of ``card``: the override (read with the card's own layout and hash), else the
    first source whose file is on this machine, else the first download that succeeds, in the card's
    order. No download is attempted while any source is present locally."""
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            raise SSLBenchError(f"weights file for {card.id} not found: {path}")
        return LocalWeights(path, "the model's `weights` option", card.layout, card.hash)
    found = local_weights(card)
    if found is not None:
        return found
    reasons = []
    for source in card.weights:
        if source.kind == "manual":
            reasons.append(str(source.instructions))
        elif source.kind == "file":
            reasons.append(f"the card's file {source.path} does not exist")
        elif source.kind == "package":
            reasons.append(_why_no_package_file(source))
        try:
            fetched = _fetch(source)
        except SSLBenchError as exc:
            reasons.append(str(exc))
            continue
        if fetched is not None:
            return _local(card, source, *fetched)
    raise SSLBenchError(
        f"weights of {card.id} are not on this machine: {'; '.join(reasons)}; "
        "or give the path of a local copy as the model's `weights` option"
    )


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
            # Entries of files that no longer exist go (a deleted download, a test's temporary folder),
            # so the file stays as long as the weights on this machine, not every path ever hashed.
            files = {path: entry for path, entry in _read_digest_cache(cache_path).items() if os.path.exists(path)}
            files[key] = {"size": before.st_size, "mtime_ns": before.st_mtime_ns, **known}
            # A read-only or full disk costs a re-hash next time, not the run.
            with contextlib.suppress(OSError):
                from sslbench.results import write_atomic

                write_atomic(cache_path, json.dumps({"version": DIGEST_CACHE_VERSION, "files": files}, indent=1))
    return {kind: known[kind] for kind in wanted}


def file_digest(path: Path, kind: str = "sha256") -> str:
    """One digest of ``path`` (see :func:`file_digests`)."""
    return file_digests(path, (kind,))[digest_kind(kind)]


def remembered_digests(path: Path) -> dict[str, str]:
    """The digests :func:`file_digests` remembered for ``path`` as it is now (same size and mtime), without
    reading the file: empty when it was never hashed or changed since."""
    resolved = path.resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return {}
    return _cached_digests(_read_digest_cache(digest_cache_path()).get(str(resolved)), stat)


def _digest_kinds(expected: WeightsHash) -> tuple[str, ...]:
    return ("sha256", digest_kind(expected.kind)) if _pinned(expected) else ("sha256",)


def _hash_problem(digests: Mapping[str, str], found: LocalWeights, card_id: str) -> str | None:
    """Why the file's digests refute it (None: they confirm it, or nothing is there to check)."""
    sha256 = digests["sha256"]
    if found.blob_sha256 is not None and sha256 != found.blob_sha256:
        return (
            f"its sha256 {sha256[:12]}… differs from its blob name {found.blob_sha256[:12]}… in the Hugging Face "
            "cache (the hub's digest of the file): a damaged or replaced file"
        )
    expected = found.expected
    if not _pinned(expected) or expected.value is None:
        return None
    actual = digests[digest_kind(expected.kind)]
    ok = actual == expected.value if expected.kind == "sha256" else actual.startswith(expected.value)
    if ok:
        return None
    return (
        f"does not match {card_id}'s {expected.kind} {expected.value} (got {actual[: max(len(expected.value), 12)]}): "
        "a different or corrupted file"
    )


def verify_weights(found: LocalWeights, card_id: str) -> str:
    """Check the file against its pinned hash and its Hugging Face blob name; returns its full sha256
    (part of the cache key). Both digests a card may need come from one read, or from the digest cache,
    which also remembers the outcome for ``sslbench models``."""
    digests = file_digests(found.path, _digest_kinds(found.expected))
    problem = _hash_problem(digests, found, card_id)
    if problem is not None:
        raise BadWeightsFile(f"weights file {found.path} ({found.where}) {problem}")
    return digests["sha256"]


@dataclass(frozen=True)
class WeightsStatus:
    """Where a card's weights stand on this machine.

    ``absent``: no source has its file here. ``present``: a file is here, its hash not checked yet (or
    nothing is published to check it against). ``verified``: the file was hashed, as it is now (same path,
    size and modification time), and matched. ``failed``: it was hashed and did not match (``detail``).
    """

    state: Literal["absent", "present", "verified", "failed"]
    where: str = ""
    detail: str = ""
    path: Path | None = None

    def __str__(self) -> str:
        if self.state == "absent":
            return "absent"
        if self.state == "verified":
            return f"verified ({self.where})"
        if self.state == "failed":
            return f"failed ({self.where} {self.path}: {self.detail})"
        return f"present ({self.where}; {self.detail})"


def weights_status(card: ModelCard, verify: bool = False) -> WeightsStatus:
    """The card's weights as :func:`resolve_weights` would find them locally, with what is known of their
    hash; ``verify`` hashes a file not hashed yet (otherwise nothing is read: listing stays fast)."""
    found = local_weights(card)
    if found is None:
        return WeightsStatus("absent")
    if not found.checkable():
        return WeightsStatus("present", found.where, "no published hash to check it against", found.path)
    kinds = _digest_kinds(found.expected)
    digests = file_digests(found.path, kinds) if verify else remembered_digests(found.path)
    if any(digest_kind(kind) not in digests for kind in kinds):
        return WeightsStatus("present", found.where, "not yet verified", found.path)
    problem = _hash_problem(digests, found, card.id)
    if problem is not None:
        return WeightsStatus("failed", found.where, problem, found.path)
    return WeightsStatus("verified", found.where, path=found.path)


def read_checkpoint(path: Path) -> Mapping[str, Any]:
    """The file's top-level dict, read without unpickling arbitrary objects."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for truncated or foreign files
        raise BadWeightsFile(f"cannot read checkpoint {path}: {exception_line(exc)}") from None
    if not isinstance(loaded, Mapping):
        raise BadWeightsFile(f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def apply_layout(checkpoint: Mapping[str, Any], layout: Layout, where: str) -> dict[str, Any]:
    """Select, strip and drop keys as the card's layout says."""
    state: Any = checkpoint
    if layout.top_level_key is not None:
        if layout.top_level_key not in checkpoint:
            raise BadWeightsFile(
                f"{where}: no '{layout.top_level_key}' entry at the top of the checkpoint "
                f"(it has: {', '.join(sorted(map(str, checkpoint))[:10])})"
            )
        state = checkpoint[layout.top_level_key]
    if not isinstance(state, Mapping):
        raise BadWeightsFile(f"{where}: the checkpoint's weights are not a mapping of tensors")
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
        raise BadWeightsFile(
            f"{where}: positional mapping needs equal key counts: model {len(model_keys)}, file {len(file_keys)}"
        )
    mapped = {}
    for model_key, file_key in zip(model_keys, file_keys, strict=True):
        kind_model, kind_file = model_key.rsplit(".", 1)[-1], file_key.rsplit(".", 1)[-1]
        shape_model, shape_file = tuple(model_state[model_key].shape), tuple(state[file_key].shape)
        if kind_model != kind_file or shape_model != shape_file:
            raise BadWeightsFile(
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
            raise BadWeightsFile(
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
        raise BadWeightsFile(f"{where}: weights do not fit the architecture: {'; '.join(problems)}")

"""Feature extraction: the backbone's own preprocessing, no augmentation, a fixed sample order,
``torch.inference_mode``, batches from a ``DataLoader`` (``workers`` processes decode images),
AMP and channels_last on CUDA; on the CPU, channels-last for convolutional backbones and, opt-in,
bfloat16 autocast on CPUs that compute it natively (see :func:`resolved_settings`); features go to
the cache in committed chunks (see :mod:`sslbench.cache`), so an interrupted extraction resumes
where it stopped.

Under ``torch.distributed`` (``torchrun ... -m sslbench extract SPEC``) the batches are split into
contiguous, batch-aligned shards, one per rank — no sample twice, no padding — and every rank
extracts the very batches a single process would; rank 0 assembles the shards, so the features
are bit-identical to a single-process extraction with the same numeric settings.
"""

from __future__ import annotations

import itertools
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sslbench.allocator import allocator_tuned, tune_allocator
from sslbench.cache import CacheEntry, CommitState, CorruptEntry, FeatureWriter
from sslbench.errors import PluginFailure, SSLBenchError, exception_line
from sslbench.interfaces import Backbone, Split
from sslbench.progress import NullProgress, Progress
from sslbench.ranks import ONE_PROCESS, Ranks

if TYPE_CHECKING:
    from sslbench.spec import ExtractionSpec


@dataclass(frozen=True)
class ExtractionSettings:
    batch_size: int = 256
    workers: int = 0
    amp: bool = True
    on_error: Literal["fail", "skip"] = "fail"
    commit_every: int = 20
    #: How messages name the backbone's code when it fails: ``backbone 'x' (plugin p, dist d 1.0)``.
    owner: str = "the backbone"
    #: ``exact``: every image decoded in full; ``reduced``: JPEGs decoded at a reduced DCT scale down to
    #: the backbone's :meth:`~sslbench.interfaces.Backbone.decode_side` (an approximation, checked).
    decode: Literal["exact", "reduced"] = "exact"
    #: The batches' memory format on the CPU: ``auto`` (channels-last for a convolutional backbone, see
    #: :func:`is_convolutional`), ``channels_last`` or ``contiguous`` (NCHW). CUDA always runs channels-last.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    #: The forward's precision on the CPU: ``float32``, or ``bfloat16`` autocast (an approximation, only on
    #: a CPU with native bfloat16: see :func:`native_bfloat16`). CUDA follows ``amp``.
    precision: Literal["float32", "bfloat16"] = "float32"

    @classmethod
    def of(cls, extraction: ExtractionSpec, owner: str = "the backbone") -> ExtractionSettings:
        """The settings a spec's ``extraction`` asks for (``sslbench run`` and :func:`sslbench.evaluate_model`
        alike), for the backbone ``owner`` names."""
        return cls(
            extraction.batch_size,
            extraction.workers,
            extraction.amp,
            extraction.on_error,
            extraction.commit_every,
            owner=owner,
            decode=extraction.decode,
            memory_format=extraction.cpu_memory_format,
            precision=extraction.cpu_precision,
        )


@dataclass
class Extracted:
    """Features and labels of one split, with the samples that could not be read (when skipped)."""

    features: np.ndarray
    labels: np.ndarray
    skipped: list[dict[str, Any]] = field(default_factory=list)
    from_cache: bool = False
    #: (rows with NaN or inf, first such row) when counted while writing the features; None: unknown.
    nonfinite: tuple[int, int] | None = None
    #: With ``decode: reduced``: how far the features are from the exact decode's, on a sample of the
    #: split (see :func:`decode_check`); ``None`` with the exact decode.
    decode_check: dict[str, Any] | None = None
    #: With ``precision: bfloat16``: the cosine of its features to float32 ones on a sample of the split
    #: (see :func:`precision_check`); ``None`` in float32.
    precision_check: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------
# Distributed ranks


def batch_shards(n: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges, one per rank, on batch boundaries, covering ``n``."""
    n_batches = -(-n // batch_size)
    bounds = [round(r * n_batches / world) for r in range(world + 1)]
    return [(min(b0 * batch_size, n), min(b1 * batch_size, n)) for b0, b1 in itertools.pairwise(bounds)]


# ------------------------------------------------------------------------------------------------
# Cores: decode workers and compute threads


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's or ``taskset``'s limit),
    else every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def pool_rate(workers: int, cores: int, decode_s: float, forward_s: float) -> float:
    """Images per second of a CPU extraction with ``workers`` decode processes and the other cores
    computing, by the simplest model: ``decode_s`` seconds of one core to decode and preprocess an image,
    ``forward_s`` seconds of one core to embed it (threads scale linearly). With no worker the main
    process decodes between forwards, all cores idle but one; with workers, the slower side sets the pace."""
    if workers == 0:
        return 1.0 / (decode_s + forward_s / cores)
    return min(workers / decode_s, (cores - workers) / forward_s)


def extraction_pool(
    workers: int,
    device: str,
    cores: int | None = None,
    threads: int | None = None,
    costs: tuple[float, float] | None = None,
) -> tuple[int, int | None]:
    """``(DataLoader workers, torch compute threads)`` for an extraction on ``device``.

    On a GPU the spec's workers decode while the device computes: they are kept, and torch's threads
    are left as they are (``None``). On the CPU the decode workers and the forward pass's compute
    threads share the ``cores`` this process may use (default :func:`usable_cores`), one per core, so
    that neither waits for a core the other holds (oversubscribed, torch's threads wait at every
    barrier of every layer for the one a worker pushed off its core): at most ``min(workers, cores - 1)``
    workers, and the threads take the remaining cores, never more than ``threads`` (default: torch's
    current number, so a limit the user set stays).

    ``costs``: ``(decode_s, forward_s)``, seconds of one core per image to decode and preprocess, and to
    embed (see :func:`measure_costs`). Given, the number of workers within that bound is the one
    :func:`pool_rate` rates fastest (the fewest among equals): a forward that costs ten times the
    decode keeps every core computing on a small machine and decodes between batches.
    """
    if not device.startswith("cpu"):
        return workers, None
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    cores = max(1, cores if cores is not None else usable_cores())
    kept = max(0, min(workers, cores - 1))
    if costs is not None and kept > 0:
        decode_s, forward_s = (max(c, 1e-9) for c in costs)
        rates = [pool_rate(w, cores, decode_s, forward_s) for w in range(kept + 1)]
        kept = max(range(kept + 1), key=lambda w: (rates[w], -w))
    return kept, max(1, min(threads, cores - kept))


#: Samples timed to size a CPU extraction's pool (see :func:`measure_costs`).
COST_SAMPLES = 4


def measure_costs(
    backbone: Backbone, split: Split, start: int, stop: int, settings: ExtractionSettings, device: str
) -> tuple[float, float] | None:
    """``(decode_s, forward_s)``: CPU seconds of one core per image to read and preprocess, and to embed,
    measured on the first :data:`COST_SAMPLES` samples of ``[start, stop)`` in this thread on one torch
    thread (the first sample read once more beforehand, untimed; the forward twice, the first call
    warming the model up). CPU time, not wall time: what a core would spend, however loaded the machine is
    now. ``None`` when none of them can be read."""
    import torch

    items = _Samples(split, backbone, start, min(stop, start + COST_SAMPLES), decode_min_side(backbone, settings))
    with compute_threads(1):  # as in a worker; torch's idle threads would spin on this thread's clock
        if len(items):
            items[0]  # once untimed: first calls initialise (imports, PIL's plugins, pass_order's probe)
        started = time.thread_time()
        tensors = [got[1] for got in (items[i] for i in range(len(items))) if got[1] is not None]
        decode_s = (time.thread_time() - started) / max(len(items), 1)
        if not tensors:
            return None
        batch = torch.stack(tensors)
        _forward(backbone, batch, device, settings)
        started = time.thread_time()
        _forward(backbone, batch, device, settings)
        forward_s = (time.thread_time() - started) / len(tensors)
    return decode_s, forward_s


@contextmanager
def compute_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block (``None``: unchanged), restored after."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_worker(worker_id: int) -> None:
    """A decode worker computes on one core: torch already limits itself there (DataLoader does); the
    BLAS and OpenMP pools of numpy and friends (SimCLRv2's resize is two matrix products) too. Its
    allocator keeps its decoded images' blocks for the next ones (a process of sslbench's own, so this
    holds in the Python API too; ``SSLBENCH_MALLOC=system`` leaves it alone)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    tune_allocator()


# ------------------------------------------------------------------------------------------------
# Reading samples


#: Marks a preprocessing failure that the plugin reported as a user error (SSLBenchError), not a bug.
USER_ERROR = "sslbench-user-error: "


class _Samples:
    """A torch ``Dataset`` over a range of a split: (index, tensor or None, error, plugin traceback).

    Only what reading the sample raises makes it *unreadable* (the dataset's ``__getitem__`` reads
    and decodes a file); what the backbone's ``preprocess`` raises is a bug in that plugin, carried
    back as text (DataLoader workers cannot re-raise arbitrary exceptions): its one-line
    :func:`~sslbench.errors.exception_line`, a newline, then its formatted traceback.
    """

    def __init__(self, split: Split, backbone: Backbone, start: int, stop: int, min_side: int | None = None) -> None:
        self.split, self.backbone, self.start, self.stop = split, backbone, start, stop
        #: With ``decode: reduced``: the side images may be decoded down to (None: full decodes). A split
        #: object that does not derive from Split and lacks ``reduced_sample`` is read in full.
        self.min_side = min_side if callable(getattr(split, "reduced_sample", None)) else None

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[int, Any, str, str]:
        index = self.start + i
        try:
            sample = self.split[index] if self.min_side is None else self.split.reduced_sample(index, self.min_side)
        except Exception as exc:  # noqa: BLE001 - decoders raise OSError, ValueError, SyntaxError, …: all mean unreadable
            return index, None, exception_line(exc), ""
        try:
            return index, self.backbone.preprocess(sample), "", ""
        except SSLBenchError as exc:  # the plugin's own one-line user error (a sample it cannot take)
            return index, None, "", f"{USER_ERROR}{exc}"
        except Exception as exc:  # noqa: BLE001 - a plugin bug, re-raised in the main process with this traceback
            return index, None, "", f"{exception_line(exc)}\n{traceback.format_exc()}"


def _collate(items: list[tuple[int, Any, str, str]]) -> tuple[list[int], Any, list[tuple[int, str]], list[str]]:
    import torch

    indices = [i for i, _, _, _ in items]
    good = [t for _, t, _, _ in items if t is not None]
    errors = [(i, e) for i, t, e, bug in items if t is None and not bug]
    bugs = [f"{i}:{bug}" for i, _, _, bug in items if bug]
    if not good:
        return indices, None, errors, bugs
    placeholder = torch.zeros_like(good[0])
    return indices, torch.stack([t if t is not None else placeholder for _, t, _, _ in items]), errors, bugs


def decode_min_side(backbone: Backbone, settings: ExtractionSettings) -> int | None:
    """The side images are decoded down to: the backbone's ``decode_side()`` with ``decode: reduced``
    (``None`` when it cannot say), else ``None`` (full decodes)."""
    if settings.decode != "reduced":
        return None
    try:
        side = backbone.decode_side()
    except SSLBenchError:
        raise
    except Exception as exc:
        raise PluginFailure(f"{settings.owner}: decode_side() raised {exception_line(exc)}") from exc
    if side is not None and (not isinstance(side, int) or isinstance(side, bool) or side < 1):
        raise PluginFailure(f"{settings.owner}: decode_side() returned {side!r}, not a positive int or None")
    return side


def _batches(
    split: Split, backbone: Backbone, start: int, stop: int, settings: ExtractionSettings, device: str
) -> Iterator[tuple[list[int], Any, list[tuple[int, str]], list[str]]]:
    from torch.utils.data import DataLoader

    loader: DataLoader[Any] = DataLoader(
        _Samples(split, backbone, start, stop, decode_min_side(backbone, settings)),  # type: ignore[arg-type]
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=settings.workers,
        collate_fn=_collate,
        pin_memory=device.startswith("cuda"),
        worker_init_fn=_init_worker if settings.workers else None,
    )
    yield from loader


class _NotFeatures(TypeError):
    """``embed`` returned something other than a floating-point tensor."""


def _forward(backbone: Backbone, batch: Any, device: str, settings: ExtractionSettings) -> np.ndarray:
    try:
        return _embed(backbone, batch, device, settings)
    except SSLBenchError:
        raise
    except _NotFeatures as exc:
        raise PluginFailure(
            f"{settings.owner}: embed() returned {exc}; expected an (n, feature_dim) float tensor"
        ) from None
    except Exception as exc:
        raise PluginFailure(f"{settings.owner}: embed() raised {exception_line(exc)}") from exc


def _features(out: Any) -> np.ndarray:
    """``embed``'s output as float32 numpy, refusing what a cast would silently mangle (integers, a
    complex tensor's imaginary part, anything not a tensor)."""
    import torch

    if not isinstance(out, torch.Tensor):
        raise _NotFeatures(f"a {type(out).__module__}.{type(out).__qualname__}, not a torch.Tensor")
    if not out.is_floating_point():
        raise _NotFeatures(f"a {out.dtype} tensor")
    return out.float().cpu().numpy()


def _embed(backbone: Backbone, batch: Any, device: str, settings: ExtractionSettings) -> np.ndarray:
    """The backbone's features of ``batch``; the memory format is the batch's alone (channels-last
    layers propagate it), so the model's own parameters are never converted on the CPU."""
    import torch

    cuda = device.startswith("cuda")
    with torch.inference_mode():
        batch = batch.to(device, non_blocking=True)
        if batch.ndim == 4 and (cuda or (device.startswith("cpu") and settings.memory_format == "channels_last")):
            batch = batch.contiguous(memory_format=torch.channels_last)
        if cuda:
            with torch.autocast("cuda", dtype=torch.float16, enabled=settings.amp):
                out = backbone.embed(batch)
        elif device.startswith("cpu") and settings.precision == "bfloat16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = backbone.embed(batch)
        else:
            out = backbone.embed(batch)
        return _features(out)


def is_convolutional(backbone: Backbone) -> bool:
    """Whether the backbone is a convolutional network: more than one 2-D convolution among its
    modules (a ViT's patch embedding is its only one). Decided by structure rather than by timing, so
    that the choice, and with it the cache key, is the same on every run of the same model."""
    import torch

    convolutions = sum(
        isinstance(layer, torch.nn.Conv2d) for module in backbone.torch_modules() for layer in module.modules()
    )
    return convolutions > 1


#: The CPU flags (``/proc/cpuinfo``) that compute bfloat16 natively, and what they are called.
BFLOAT16_FLAGS = {"avx512_bf16": "AVX-512-BF16", "amx_bf16": "AMX-BF16"}
CPUINFO = Path("/proc/cpuinfo")


def native_bfloat16() -> str | None:
    """The CPU's native bfloat16 instructions (``"AVX-512-BF16"`` or ``"AMX-BF16"``), as torch's probe or
    else the kernel's CPU flags report them; ``None`` when it has none (bfloat16 would be emulated,
    slower than float32)."""
    import torch

    probes = (("AMX-BF16", "_is_amx_tile_supported"), ("AVX-512-BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return name
    try:
        with CPUINFO.open() as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return None
    return next((BFLOAT16_FLAGS[flag] for flag in BFLOAT16_FLAGS if flag in flags), None)


def check_precision(precision: str, device: str) -> None:
    """Refuse ``precision: bfloat16`` on a CPU without native bfloat16, in one line."""
    if precision == "bfloat16" and device.startswith("cpu") and native_bfloat16() is None:
        raise SSLBenchError(
            "extraction.cpu_precision: bfloat16 needs a CPU with native bfloat16 (AVX-512-BF16 or AMX); "
            "this one has neither, where bfloat16 is emulated and slower than float32: use float32"
        )


def resolved_settings(backbone: Backbone, settings: ExtractionSettings, device: str) -> ExtractionSettings:
    """``settings`` as the extraction on ``device`` runs them: the memory format decided (on the CPU,
    ``auto`` is channels-last for a convolutional backbone, NCHW otherwise; CUDA runs channels-last,
    other devices NCHW) and the precision checked (on the CPU) or float32 (elsewhere, where ``amp``
    rules)."""
    if not device.startswith("cpu"):
        on_cuda = device.startswith("cuda")
        return replace(settings, memory_format="channels_last" if on_cuda else "contiguous", precision="float32")
    check_precision(settings.precision, device)
    if settings.memory_format == "auto":
        return replace(settings, memory_format="channels_last" if is_convolutional(backbone) else "contiguous")
    return settings


def forward_precision(settings: ExtractionSettings, device: str) -> str:
    """The precision the forward runs in: float16 autocast on CUDA with ``amp``, else the (resolved)
    settings' CPU precision."""
    return "float16" if device.startswith("cuda") and settings.amp else settings.precision


def key_numerics(settings: ExtractionSettings, device: str) -> tuple[str, str]:
    """``(memory format, precision)`` as a cache key records them: the CPU's (resolved settings). Other
    devices record the defaults, NCHW and float32, as before the settings existed."""
    if not device.startswith("cpu"):
        return "contiguous", "float32"
    return settings.memory_format, settings.precision


def prepare_backbone(backbone: Backbone, device: str) -> Backbone:
    """Move to ``device``; channels_last memory format for the model's modules on CUDA."""
    import torch

    backbone = backbone.to(device)
    if device.startswith("cuda"):
        for module in backbone.torch_modules():
            module.to(memory_format=torch.channels_last)
    return backbone


# ------------------------------------------------------------------------------------------------
# Extraction


def _check_shape(backbone: Backbone, features: np.ndarray, expected_rows: int, owner: str, call: str = "embed") -> None:
    """Features of ``expected_rows`` rows and the backbone's declared width, or the plugin's bug."""
    if features.ndim != 2 or len(features) != expected_rows:
        raise PluginFailure(
            f"{owner}: {call}() returned features of shape {tuple(features.shape)} for {expected_rows} samples; "
            "expected (samples, feature_dim)"
        )
    if backbone.feature_dim is not None and features.shape[1] != backbone.feature_dim:
        raise PluginFailure(
            f"{owner}: {call}() returned {features.shape[1]}-d features; the backbone declares "
            f"feature_dim {backbone.feature_dim}"
        )


def _handle_errors(
    errors: list[tuple[int, str]], split: Split, settings: ExtractionSettings, name: str
) -> list[dict[str, Any]]:
    skipped = []
    for index, error in errors:
        if settings.on_error == "fail":
            raise SSLBenchError(
                f"{name}: cannot read {split.describe(index)}: {error} "
                "(set extraction.on_error: skip to skip unreadable samples)"
            )
        skipped.append({"index": index, "sample": split.describe(index), "error": error})
    return skipped


def _extract_range(
    backbone: Backbone,
    split: Split,
    entry: CacheEntry,
    start: int,
    stop: int,
    settings: ExtractionSettings,
    device: str,
    name: str,
    task: Any,
) -> None:
    """Extract rows ``[start, stop)`` of ``split`` into ``entry``, resuming from its progress (call with
    the entry locked)."""
    progress = entry.progress()
    if progress.dims is not None and progress.committed >= stop - start:
        task.advance(stop - start)
        return
    resume_from = progress.committed
    writer: FeatureWriter | None = None
    if resume_from and progress.dims is not None:
        writer = entry.open_features(stop - start, progress.dims, progress, fresh=False)
        progress.resumed_at.append(start + resume_from)
    else:
        progress = CommitState()
    task.advance(resume_from)
    try:
        batches_since_commit = 0
        for indices, batch, errors, bugs in _batches(split, backbone, start + resume_from, stop, settings, device):
            if bugs:
                index, _, problem = bugs[0].partition(":")
                if problem.startswith(USER_ERROR):
                    raise SSLBenchError(f"{name}: {problem[len(USER_ERROR) :]}")
                # The first line whole (the CLI prints it), then the traceback from the worker.
                error, _, worker_traceback = problem.partition("\n")
                raise PluginFailure(
                    f"{settings.owner}: preprocess() raised {error} (on {split.describe(int(index))})\n"
                    f"{worker_traceback}"
                )
            progress.skipped += _handle_errors(errors, split, settings, name)
            if batch is not None:
                out = _forward(backbone, batch, device, settings)
                _check_shape(backbone, out, len(indices), settings.owner)
                if errors:
                    out[[i - indices[0] for i, _ in errors]] = 0.0
                bad = ~np.isfinite(out).all(axis=1)
                if bad.any():
                    if progress.first_nonfinite < 0:
                        progress.first_nonfinite = indices[0] + int(np.argmax(bad))
                    progress.nonfinite_rows += int(bad.sum())
                if writer is None:
                    progress.dims = int(out.shape[1])
                    writer = entry.open_features(stop - start, progress.dims, progress, fresh=True)
                writer.write(indices[0] - start, out)
            progress.committed = indices[-1] - start + 1
            batches_since_commit += 1
            task.advance(len(indices))
            if writer is not None and batches_since_commit >= settings.commit_every:
                writer.commit(progress.committed)
                batches_since_commit = 0
        if writer is None:
            raise SSLBenchError(f"{name}: no sample could be read")
        writer.commit(stop - start, final=True)
    finally:
        if writer is not None:
            writer.close()


def extract_split(
    backbone: Backbone,
    split: Split,
    *,
    settings: ExtractionSettings,
    device: str,
    name: str,
    entry: CacheEntry | None,
    progress: Progress | None = None,
    reextract_corrupt: bool = False,
    ranks: Ranks = ONE_PROCESS,
) -> Extracted:
    """Features of every sample of ``split`` in order: from the cache, or extracted into it.

    With ``ranks`` of several processes (``torchrun -m sslbench extract``; each calls with the same
    ``entry``, in a folder they share), each rank extracts its shard (:func:`batch_shards`) and rank 0
    assembles the entry, which every rank then loads.

    A cached entry is verified before use (key, shape, checksums of every byte); a corrupt one stops
    the run with one line naming it and the command that removes it (:class:`CorruptEntry`), or, with
    ``reextract_corrupt``, is emptied and extracted again.
    """
    progress = progress or NullProgress()
    whole = split.as_array()
    if whole is not None:
        try:
            direct = backbone.embed_array(whole)
        except SSLBenchError:
            raise
        except Exception as exc:
            raise PluginFailure(f"{settings.owner}: embed_array() raised {exception_line(exc)}") from exc
        if direct is not None:
            _check_shape(backbone, np.asarray(direct), len(whole), settings.owner, "embed_array")
            return Extracted(direct, split.labels)
    if entry is None:
        raise ValueError("extract_split needs a cache entry for a model that runs batch by batch")
    settings = resolved_settings(backbone, settings, device)
    corrupt = None
    if entry.claims_complete():
        try:
            return _loaded(entry, from_cache=True)
        except CorruptEntry as exc:
            if not reextract_corrupt:
                raise
            corrupt = exc
    if corrupt is not None:
        ranks.barrier()  # every rank has read the entry before rank 0 empties it
        if ranks.rank == 0:
            _discard(entry)
        ranks.barrier()

    n = len(split)
    task = progress.task(f"extract {name}", n if not ranks.distributed else None, unit="img")
    started = time.perf_counter()
    costs = None
    if device.startswith("cpu") and settings.workers > 0 and usable_cores() > 1:
        first = batch_shards(n, settings.batch_size, ranks.world)[ranks.rank][0]
        costs = measure_costs(backbone, split, first, n, settings, device)
    workers, threads = extraction_pool(settings.workers, device, costs=costs)
    settings = replace(settings, workers=workers)

    def provenance() -> dict[str, Any]:
        found: dict[str, Any] = {
            "batch_size": settings.batch_size,
            "device": device,
            "amp": settings.amp and device.startswith("cuda"),
            "ranks": ranks.world,
            "extract_s": time.perf_counter() - started,
            "sample_count": n,
            "workers": workers,
            "decode": settings.decode,
            "memory_format": settings.memory_format,
            "precision": forward_precision(settings, device),
            "allocator": "tuned" if allocator_tuned() else "system",
        }
        if threads is not None:
            found["threads"] = threads
        if costs is not None:
            found["pool_costs_ms"] = [round(1e3 * c, 3) for c in costs]  # decode, forward: per image, per core
        if settings.decode != "exact":
            found["decode_check"] = decode_check(backbone, split, settings, device)
        if settings.precision != "float32":
            found["precision_check"] = precision_check(backbone, split, settings, device)
        return found

    with compute_threads(threads):
        found = _extract_or_assemble(
            backbone, split, entry, settings, device, name, task, ranks, provenance, reextract_corrupt
        )
    return found if found is not None else _loaded(entry, from_cache=False)


def _extract_or_assemble(
    backbone: Backbone,
    split: Split,
    entry: CacheEntry,
    settings: ExtractionSettings,
    device: str,
    name: str,
    task: Any,
    ranks: Ranks,
    provenance: Callable[[], dict[str, Any]],
    reextract_corrupt: bool,
) -> Extracted | None:
    """Extract (or, under torchrun, extract this rank's shard and assemble) ``split`` into ``entry``;
    the entry's features when another process finished it while this one waited for its lock."""
    n = len(split)

    if not ranks.distributed:
        with entry.locked():
            for attempt in (0, 1):
                try:
                    if entry.claims_complete():  # finished by another process while this one waited
                        return _loaded(entry, from_cache=True)
                    _extract_range(backbone, split, entry, 0, n, settings, device, name, task)
                    entry.finish(split.labels, provenance())
                    break
                except CorruptEntry:
                    if not reextract_corrupt or attempt:
                        raise
                    entry.discard()
    else:
        shards = batch_shards(n, settings.batch_size, ranks.world)
        start, stop = shards[ranks.rank]
        shard_entry = _shard(entry, start, stop)
        if stop > start:
            with shard_entry.locked():
                _extract_range(backbone, split, shard_entry, start, stop, settings, device, name, task)
        ranks.barrier()
        if ranks.rank == 0:
            with entry.locked():
                if not entry.claims_complete():
                    _assemble(entry, shards, n)
                    entry.finish(split.labels, provenance())
        ranks.barrier()
    return None


#: Samples of a split whose features ``decode: reduced`` compares with the exact decode's.
DECODE_CHECK_SAMPLES = 32


def decode_check(
    backbone: Backbone, split: Split, settings: ExtractionSettings, device: str, samples: int = DECODE_CHECK_SAMPLES
) -> dict[str, Any]:
    """How far ``decode: reduced`` moves the features: the cosine between the features of the reduced
    and of the exact decode of ``samples`` samples spread evenly over the split (the same forward pass,
    both in one batch), and how many of them were decoded smaller than in full. Samples that cannot be
    read are left out."""
    import torch

    min_side = decode_min_side(backbone, settings)
    exact, reduced, smaller = [], [], 0
    for index in _spread(len(split), samples):
        full = _Samples(split, backbone, index, index + 1)[0]
        small = _Samples(split, backbone, index, index + 1, min_side)[0] if min_side is not None else full
        if full[1] is None or small[1] is None:
            continue
        exact.append(full[1])
        reduced.append(small[1])
        smaller += 0 if torch.equal(full[1], small[1]) else 1
    record: dict[str, Any] = {"samples": len(exact), "min_side": min_side, "changed": smaller}
    if not exact:
        return record
    features = _forward(backbone, torch.stack(exact + reduced), device, settings)
    record.update(_cosines(features[: len(exact)], features[len(exact) :]))
    return record


#: Samples of a split whose features ``precision: bfloat16`` compares with float32 ones.
PRECISION_CHECK_SAMPLES = 32


def precision_check(
    backbone: Backbone,
    split: Split,
    settings: ExtractionSettings,
    device: str,
    samples: int = PRECISION_CHECK_SAMPLES,
) -> dict[str, Any]:
    """How far the precision moves the features: the cosine between the features of ``samples``
    samples spread evenly over the split computed in ``settings.precision`` and in float32 (the same
    batch, the same decode and memory format). Samples that cannot be read are left out."""
    import torch

    min_side = decode_min_side(backbone, settings)
    tensors = []
    for index in _spread(len(split), samples):
        got = _Samples(split, backbone, index, index + 1, min_side)[0][1]
        if got is not None:
            tensors.append(got)
    record: dict[str, Any] = {"samples": len(tensors), "precision": settings.precision}
    if not tensors:
        return record
    batch = torch.stack(tensors)
    approximate = _forward(backbone, batch, device, settings)
    reference = _forward(backbone, batch, device, replace(settings, precision="float32"))
    record.update(_cosines(approximate, reference))
    return record


def _spread(n: int, samples: int) -> list[int]:
    """Up to ``samples`` row indices spread evenly over ``n`` rows, first and last included."""
    count = min(samples, n)
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})


def _cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean and least cosine between the rows of ``a`` and ``b`` (in float64)."""
    import torch

    cosine = torch.nn.functional.cosine_similarity(
        torch.from_numpy(a).double(), torch.from_numpy(b).double(), dim=1, eps=1e-12
    )
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}


def _discard(entry: CacheEntry) -> None:
    """Empty a corrupt entry (a link or a file in its place is removed itself)."""
    if entry.path.is_dir() and not entry.path.is_symlink():
        with entry.locked():
            entry.discard()
    else:
        entry.discard()


def _shard(entry: CacheEntry, start: int, stop: int) -> CacheEntry:
    return CacheEntry(entry.path / f"shard-{start}-{stop}", entry.key, entry.root)


def _loaded(entry: CacheEntry, from_cache: bool) -> Extracted:
    features, labels, manifest = entry.load()
    nonfinite = (manifest.nonfinite_rows, manifest.first_nonfinite)
    extra = manifest.model_extra or {}
    decode, precision = (extra.get(name) for name in ("decode_check", "precision_check"))
    return Extracted(
        features,
        labels,
        manifest.skipped,
        from_cache=from_cache,
        nonfinite=nonfinite,
        decode_check=decode if isinstance(decode, dict) else None,
        precision_check=precision if isinstance(precision, dict) else None,
    )


def _assemble(entry: CacheEntry, shards: list[tuple[int, int]], n: int) -> None:
    """Rank 0: copy every rank's shard into the entry's features, in order, checking each shard's
    checksums on the way; the entry's checksums are the shards' (rows offset by the shard's start), so
    the copy is the only pass over the data."""
    import shutil

    parts = []
    state = CommitState()
    for start, stop in shards:
        if stop <= start:
            continue
        shard = _shard(entry, start, stop)
        shard_progress = shard.progress()
        if shard_progress.committed != stop - start or shard_progress.dims is None:
            raise RuntimeError(f"shard {start}-{stop} is incomplete ({shard_progress.committed} rows)")
        state.dims = shard_progress.dims
        parts.append((start, stop, shard, shard_progress))
        state.skipped += shard_progress.skipped
        state.resumed_at += shard_progress.resumed_at
        state.nonfinite_rows += shard_progress.nonfinite_rows
        if state.first_nonfinite < 0:
            state.first_nonfinite = shard_progress.first_nonfinite
    assert state.dims is not None
    writer = entry.open_features(n, state.dims, state, fresh=True)
    try:
        for start, _, shard, shard_progress in parts:
            writer.copy_shard(shard, shard_progress, start)
        state.committed = n
        writer.commit(n, final=True)
    finally:
        writer.close()
    for _, _, shard, _ in parts:
        shutil.rmtree(shard.path)


def init_distributed_from_env() -> Ranks:
    """Join the process group that ``torchrun`` describes in the environment (no-op without it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ONE_PROCESS
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Ranks.of_process_group()

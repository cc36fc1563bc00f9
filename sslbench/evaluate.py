"""The Python API: what an SSL paper calls from its own eval suite or training loop.

:func:`evaluate_features` runs the same stages as ``sslbench run`` (:mod:`sslbench.pipeline`) on
features in memory or memory-mapped on disk; :func:`evaluate_model` first extracts them with a model
in memory. Both return the same typed :class:`Results`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from sslbench.cache import CacheKey, FeatureCache, run_scratch
from sslbench.devices import is_device_name, missing_device, resolve_device, unavailable
from sslbench.errors import SSLBenchError, did_you_mean
from sslbench.events import Emit, ignore
from sslbench.extract import Extracted, ExtractionSettings, extract_split, forward_precision, resolved_settings
from sslbench.inputs import FeatureSplit, checked_split, class_index
from sslbench.interfaces import Backbone, Dataset
from sslbench.isolation import untouched_training, unwrapped
from sslbench.pipeline import plan_protocol, run_probes, run_protocol
from sslbench.plugins import Plugins, get_plugins
from sslbench.ranks import Ranks
from sslbench.results import ExtractionRecord, Results, build_results, environment
from sslbench.sharded import extract_across_ranks, picklable, use_rank_zero_state
from sslbench.spec import ExtractionSpec, ProbeSpec, ProtocolSpec, ResolvedProbe, labelled_main_score


def evaluate_features(
    train_features: Any,
    train_labels: Any,
    eval_features: Any,
    eval_labels: Any,
    *,
    n_clusters: int | None = None,
    overcluster: float | Sequence[float] | None = None,
    pca_dim: int | Sequence[int | None] | None = None,
    whiten: bool | None = None,
    epochs: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    seeds: int | Sequence[int] | None = None,
    backend: str | None = None,
    backend_options: dict[str, Any] | None = None,
    preset: str | Sequence[str] | None = None,
    protocol: Mapping[str, Any] | None = None,
    probes: Sequence[Mapping[str, Any]] = (),
    device: str = "auto",
    n_classes: int | None = None,
    model: str = "features",
    dataset: str = "features",
    plugins: Plugins | None = None,
    scratch_dir: str | Path | None = None,
    emit: Emit = ignore,
    fit_split: str = "train",
    eval_split: str = "val",
) -> Results:
    """Cluster precomputed features with the paper's protocol and score them.

    PCA and k-means are fitted on the train features; the eval features are predicted and scored
    with the cluster → class assignment built on the train split. Every metric is computed per seed
    and summarised as mean ± sample std.

    Inputs follow one contract (the same as the ``features`` dataset of a spec): features are a
    non-empty 2-D array of a floating or integer dtype, finite, of largest magnitude between 2^-100 and
    2^100 (or all zero); labels are non-negative integers (any integer dtype, or whole-number floats).
    Integer parameters may be NumPy integers, and ``seeds`` or ``pca_dim`` NumPy arrays.

    A protocol parameter left at ``None`` takes a spec's default (:class:`~sslbench.spec.ProtocolSpec`,
    the one place they are set: 60 epochs, seeds 0..4, overcluster 1, no whitening, all PCA components,
    ``k`` = classes, the ``torch`` backend), so ``sslbench run`` and this call agree unless told otherwise.

    :param train_features: ``(n_train, d)`` array (a ``np.memmap`` is read in chunks).
    :param train_labels: ``(n_train,)`` integer class indices, or ``None`` (and ``eval_labels`` too) for
        features without labels: then ``n_clusters`` must be given, no probe can run, and the runs hold
        the label-free scores only (silhouette, Davies–Bouldin, Calinski–Harabasz, RankMe).
    :param n_clusters: clusters before overclustering; ``None`` = number of classes.
    :param overcluster: fit ``int(overcluster × n_clusters)`` clusters; a list sweeps.
    :param pca_dim: PCA components to keep; ``None`` keeps all; a list sweeps.
    :param epochs: k-means epochs; ``None`` = the preset's (the paper's: 60).
    :param seeds: a count ``n`` (seeds ``0..n-1``) or explicit seeds; ``None`` = the preset's (the paper's: 5).
    :param backend: ``reference`` (the paper's scikit-learn code) or ``torch`` (fast, CPU or GPU); ``None`` = the
        preset's (the paper's: torch).
    :param backend_options: options of the backend's clusterer, e.g. ``{"prune": False}``.
    :param preset: the published protocol(s) followed, as a spec's ``protocol.preset`` (default the paper's).
    :param protocol: any other ``protocol`` field of a spec, e.g. ``{"algorithm": "lloyd", "n_init": 3}``; every
        value given (here or above) overrides the preset's.
    :param probes: evaluations that learn from the train labels, each ``{"id": …, "options": {…}}`` as in a
        spec's ``probes``: e.g. ``[{"id": "knn", "options": {"k": [10, 20]}}, {"id": "linear"}]``; run once on
        the raw features and stored in ``results.probes`` (each summary row shows their values).
    :param device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``; used by backends that run on GPUs.
    :param n_classes: number of classes (every label must be below it); ``None`` = ``max(label) + 1``
        over both splits, unless the labels are sparse (the largest at least twice the number of
        distinct labels plus 64): then the distinct labels are renumbered 0..m-1 in increasing order
        and there are m classes. Contiguous labels are never renumbered.
    :param scratch_dir: where the PCA projections are written while the runs last (removed after);
        default a folder beside the feature cache (``$SSLBENCH_CACHE``).
    :param emit: receives :class:`~sslbench.events.Event` objects (stages, runs) as they happen.
    :param fit_split: the name of the train features' split, as runs and probe records show it.
    :param eval_split: the name of the eval features' split, as runs and probe records show it (and the
        reports' caption: "scored on …").
    :returns: :class:`~sslbench.results.Results` with ``runs`` (per seed) and ``summary``.
    :raises SSLBenchError: unusable input (a dtype, shape or value outside the contract, NaN/inf,
        mismatched shapes, k larger than the train set, an unknown device), in one line.
    """
    started = time.perf_counter()
    plugins = plugins or get_plugins()
    chosen = _chosen_protocol(
        "evaluate_features",
        pca_dim=pca_dim,
        whiten=whiten,
        n_clusters=n_clusters,
        overcluster=overcluster,
        epochs=epochs,
        batch_size=batch_size,
        seeds=seeds,
        backend=backend,
        backend_options=backend_options,
        preset=preset,
        protocol=protocol,
    )
    train = checked_split("train", train_features, train_labels)
    eval_ = checked_split("eval", eval_features, eval_labels)
    if not (train.labeled and eval_.labeled):
        classes = _unlabeled_classes(train, eval_, n_classes)
        main = labelled_main_score(chosen, plugins)
        if main is not None:
            raise SSLBenchError(
                f"evaluate_features: main_score: '{main}' compares clusters with classes; the features have no labels"
            )
    elif n_classes is None:
        index = class_index([train.labels, eval_.labels])
        classes = index.n_classes
        if index.ids is not None:
            train = FeatureSplit(train.name, train.features, index.apply(train.labels))
            eval_ = FeatureSplit(eval_.name, eval_.features, index.apply(eval_.labels))
    else:
        classes = _count("n_classes", n_classes)
    resolved_probes = _resolved_probes(probes, plugins)
    device = resolve_device(_checked_device(device))
    plan = plan_protocol(
        train,
        eval_,
        n_classes=classes,
        protocol=chosen,
        plugins=plugins,
        model=model,
        dataset=dataset,
        device=device,
        probes=resolved_probes,
        fit_split=fit_split,
        eval_split=eval_split,
    )
    probe_records = run_probes(plan, emit)
    with run_scratch(Path(scratch_dir) if scratch_dir is not None else None) as scratch:
        runs = list(run_protocol(plan, scratch=scratch, emit=emit))
    env = environment(device, plugins)
    spec = {
        "api": "evaluate_features",
        "protocol": chosen.model_dump(mode="json"),
        "resolved_protocol": [resolved.model_dump(mode="json") for resolved in chosen.resolved()],
        "probes": [{"id": p.name, "options": p.options.model_dump(mode="json")} for p in resolved_probes],
    }
    return build_results(
        runs,
        spec=spec,
        env=env,
        wall_s=time.perf_counter() - started,
        metrics=plan.metric_descriptors,
        probes=probe_records,
    )


def _chosen_protocol(
    api: str,
    *,
    pca_dim: Any = None,
    whiten: Any = None,
    n_clusters: Any = None,
    overcluster: Any = None,
    epochs: Any = None,
    batch_size: Any = None,
    seeds: Any = None,
    backend: str | None = None,
    backend_options: Mapping[str, Any] | None = None,
    preset: Any = None,
    protocol: Mapping[str, Any] | None = None,
) -> ProtocolSpec:
    """The protocol the API's keywords ask for, validated as a spec's ``protocol``: a keyword left at
    ``None`` is the preset's value (only the values given override it); one line naming the field else."""
    given = {
        "pca_dims": _plain(pca_dim),
        "whiten": _plain(whiten),
        "k": _plain(n_clusters),
        "overcluster": _plain(overcluster),
        "epochs": _plain(epochs),
        "batch_size": _plain(batch_size),
        "seeds": _plain(seeds),
        "backend": backend,
        "backend_options": _plain(dict(backend_options)) if backend_options else None,
        "preset": _plain(preset),
        **{key: _plain(value) for key, value in (protocol or {}).items()},
    }
    try:
        chosen = ProtocolSpec.model_validate({key: value for key, value in given.items() if value is not None})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"][:1])
        raise SSLBenchError(f"{api}: {field}: {err['msg']} (got {err.get('input')!r})") from None
    return chosen


def _unlabeled_classes(train: FeatureSplit, eval_: FeatureSplit, n_classes: int | None) -> int:
    """0, the number of classes of features without labels; labels on one split only, or a number of
    classes without labels, is a one-line error."""
    if train.labeled or eval_.labeled:
        given, missing = ("train", "eval") if train.labeled else ("eval", "train")
        raise SSLBenchError(
            f"evaluate_features: {given}_labels given but {missing}_labels is None; give both, or neither "
            "for label-free scores only"
        )
    if n_classes is not None:
        raise SSLBenchError("evaluate_features: n_classes given without labels; leave it None")
    return 0


def _resolved_probes(probes: Sequence[Mapping[str, Any]], plugins: Plugins) -> tuple[ResolvedProbe, ...]:
    """The API's ``probes`` as a spec's: each ``{"id": …, "options": {…}}``, the id registered, the options
    validated by the probe's model, no metric recorded twice; else a one-line error naming the probe."""
    if isinstance(probes, Mapping | str):
        raise SSLBenchError("evaluate_features: probes: give a list of {'id': …, 'options': {…}}")
    resolved: list[ResolvedProbe] = []
    for index, given in enumerate(probes):
        try:
            spec = ProbeSpec.model_validate(_plain(dict(given)) if isinstance(given, Mapping) else given)
        except ValidationError as exc:
            raise api_error(exc, f"probes[{index}]", show_input=False) from None
        try:
            entry = plugins.probes.get(spec.id)
        except SSLBenchError as exc:
            raise SSLBenchError(f"evaluate_features: probes[{index}].id: {exc}") from None
        try:
            options = entry.options.model_validate(spec.options)
        except ValidationError as exc:
            raise api_error(exc, f"probes[{index}].options", show_input=True) from None
        probe = ResolvedProbe(entry, options)
        taken = [name for earlier in resolved for name in earlier.metrics() if name in probe.metrics()]
        if taken:
            raise SSLBenchError(
                f"evaluate_features: probes[{index}]: metric '{taken[0]}' is recorded by an earlier probe"
            )
        resolved.append(probe)
    return tuple(resolved)


def api_error(exc: ValidationError, at: str, show_input: bool, api: str = "evaluate_features") -> SSLBenchError:
    """``<api>: <at>.<field>: <message>`` for the first error of ``exc`` (with the value given)."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    shown = f" (got {err.get('input')!r})" if show_input else ""
    return SSLBenchError(f"{api}: {'.'.join(part for part in (at, where) if part)}: {err['msg']}{shown}")


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays as the Python numbers and lists the protocol's model takes (a seed
    given as ``np.int64(3)`` or ``np.arange(5)`` is as good as ``3`` or ``range(5)``)."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence | range) and not isinstance(value, str | bytes):
        return [_plain(item) for item in value]
    return value


def _count(name: str, value: Any) -> int:
    """A positive integer parameter: a Python or NumPy integer (not a bool)."""
    plain = _plain(value)
    if isinstance(plain, bool) or not isinstance(plain, int) or plain < 1:
        raise SSLBenchError(f"evaluate_features: {name}: must be a positive integer (got {value!r})")
    return plain


def _checked_device(device: Any) -> str:
    """``device`` checked as a spec's is (:mod:`sslbench.devices`), in the API's words."""
    if not is_device_name(device):
        raise SSLBenchError(
            f"evaluate_features: device: {device!r} is not a device; valid devices: auto, cpu, cuda, cuda:N, mps"
        )
    missing = missing_device(device)
    if missing is not None:
        raise SSLBenchError(f"evaluate_features: device: {unavailable(device, missing)}")
    return str(device)


# --------------------------------------------------------------------------------------------------
# A model in memory


def imagenet_eval_transform(resize: int = 256, crop: int = 224) -> Any:
    """torchvision's ImageNet evaluation transform (resize the short side, centre crop, normalise),
    the default preprocessing of :func:`evaluate_model`; any sample is converted to RGB first."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Lambda(_as_rgb),
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def _as_rgb(sample: Any) -> Any:
    from PIL import Image

    image = sample if isinstance(sample, Image.Image) else Image.fromarray(np.asarray(sample))
    return image.convert("RGB")


class _InMemoryModel(Backbone):
    """A user's model (a ``torch.nn.Module`` or any callable batch → features) as a backbone."""

    def __init__(self, model: Any, transform: Any) -> None:
        self.model, self.transform = model, transform

    def preprocess(self, sample: Any) -> Any:
        return self.transform(sample)

    def embed(self, batch: Any) -> Any:
        out = self.model(batch)
        if not hasattr(out, "ndim") or out.ndim != 2:
            shape = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
            raise SSLBenchError(f"evaluate_model: the model must return (batch, dims) features, got {shape}")
        return out

    def torch_modules(self) -> list[Any]:
        import torch

        return [self.model] if isinstance(self.model, torch.nn.Module) else []


def _model_device(model: Any) -> str:
    import torch

    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return str(tensor.device)
    return "cpu"


#: What evaluate_model sets itself when it calls evaluate_features; its other keywords come from the caller.
SET_BY_EVALUATE_MODEL = frozenset(
    {"n_classes", "model", "dataset", "plugins", "scratch_dir", "emit", "fit_split", "eval_split"}
)


def protocol_keywords() -> set[str]:
    """The keywords :func:`evaluate_model` passes on to :func:`evaluate_features` (the protocol's, the
    probes', the device)."""
    parameters = inspect.signature(evaluate_features).parameters.values()
    return {p.name for p in parameters if p.kind == p.KEYWORD_ONLY} - SET_BY_EVALUATE_MODEL


def evaluate_model(
    model: Any,
    dataset: str | Dataset,
    *,
    dataset_options: dict[str, Any] | None = None,
    transform: Any = None,
    fit_split: str = "train",
    eval_split: str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    amp: bool = True,
    cpu_memory_format: str = "auto",
    cpu_precision: str = "float32",
    name: str = "model",
    plugins: Plugins | None = None,
    scratch_dir: str | Path | None = None,
    emit: Emit = ignore,
    ranks: Ranks | None = None,
    **protocol: Any,
) -> Results:
    """Extract features of ``dataset`` with a model in memory, then cluster and score them exactly
    as :func:`evaluate_features` does (the same typed :class:`Results`).

    Meant to be called from a training loop every N epochs::

        for epoch in range(epochs):
            train_one_epoch(encoder)
            if epoch % 10 == 0:
                results = sslbench.evaluate_model(encoder, "fashion_mnist", transform=eval_tf, seeds=3, epochs=20)
                log(epoch, results.summary[0].metrics["acc"].mean)

    :param model: a ``torch.nn.Module`` (every submodule in eval mode while features are extracted;
        never moved: batches go to the device of its parameters; a ``DistributedDataParallel`` wrapper's
        module is called directly) or any callable
        mapping a batch tensor to ``(batch, dims)`` features. Called under ``torch.inference_mode``,
        with float16 autocast on CUDA when ``amp``. Its parameters are never converted: the batches
        alone are channels-last (on CUDA, and on the CPU as ``cpu_memory_format`` says), so the model
        comes back in the memory format it came in.
    :param dataset: a registered dataset id (``digits``, ``fashion_mnist``, ``imagefolder`` …, with
        ``dataset_options``) or a :class:`~sslbench.interfaces.Dataset`.
    :param transform: sample (a PIL image or an array) → input tensor; default
        :func:`imagenet_eval_transform`.
    :param cpu_memory_format: on the CPU, ``auto`` (channels-last batches for a convolutional model),
        ``channels_last`` or ``contiguous``, as the spec's ``extraction.cpu_memory_format``.
    :param cpu_precision: on the CPU, ``float32`` or ``bfloat16`` (autocast, refused on a CPU without
        native bfloat16), as the spec's ``extraction.cpu_precision``; the cosine of bfloat16 features to
        float32 ones on 32 samples per split is in the results' ``extraction`` records.
    :param fit_split: the split PCA and k-means are fitted on; ``eval_split`` (default: ``val`` if the
        dataset has it, else ``test``) is predicted and scored.
    :param ranks: the processes that evaluate together (:class:`~sslbench.ranks.Ranks`); default: every
        rank of the default process group when ``torch.distributed`` is initialised, else this process.
        :data:`~sslbench.ranks.ONE_PROCESS` evaluates in this process alone (e.g. on rank 0 only).
    :param protocol: every keyword :func:`evaluate_features` takes for the protocol (``n_clusters``,
        ``overcluster``, ``pca_dim``, ``epochs``, ``seeds``, ``backend``, ``probes`` …).
    :returns: the results; ``spec`` records ``{"api": "evaluate_model", "dataset": …}``.

    Features go to a scratch folder removed at the end (nothing is cached: a model being trained
    changes between calls). The C allocator's settings of this process are left as they are; a program
    that extracts on the CPU gains from calling :func:`sslbench.allocator.tune_allocator` once (see its
    notes).

    **No side effects on the training.** After the call, whatever its exit: every submodule's
    train/eval mode, ``requires_grad``, the buffers (BatchNorm's running statistics), grad mode, the CPU
    and CUDA autocast state, torch's intra-op thread count and the random states of Python, NumPy's
    global generator, torch's CPU and CUDA generators are exactly as they were
    (:mod:`sslbench.isolation`), so a training with evaluation calls between its epochs ends with the
    weights it has without them.

    **Under torch.distributed** (called with a process group initialised, any backend): every rank of
    ``ranks`` (default: the default group's) must call it, with the same arguments and a model of the
    same weights (as DDP keeps them; checked, a one-line error otherwise). Every rank embeds with rank
    0's buffers: under DDP each rank's last training forward updated BatchNorm's running statistics with
    its own batch, and rank 0's are the ones DDP's next forward would use (each rank's own are given back
    after the call). Each rank embeds a contiguous, batch-aligned shard of every split —
    no padding, no sample twice, empty shards where a split has fewer batches than there are ranks —
    into its own scratch folder (no shared file system needed) and sends it to rank 0 through the
    process group, in bounded chunks; rank 0 alone holds the assembled rows (in sample order), runs PCA,
    k-means and the probes, and broadcasts its :class:`Results`, which every rank returns. They equal a
    one-process call's on the same data and weights to the last digit (the same batches, so
    bit-identical features, when the ranks compute with the same thread count as that process). An
    exception on any rank is raised on every rank. The other ranks wait for rank 0's clustering inside
    a collective: the process group's ``timeout`` must exceed it.
    """
    # From the first statement: loading plugins, a dataset or scikit-learn may draw Python's random numbers.
    with untouched_training(model):
        unknown = sorted(set(protocol) - protocol_keywords())
        if unknown:
            raise SSLBenchError(
                f"evaluate_model: unknown keyword '{unknown[0]}'{did_you_mean(unknown[0], protocol_keywords())}"
            )
        settable = {key: value for key, value in protocol.items() if key not in ("probes", "device")}
        _chosen_protocol("evaluate_model", **settable)  # its values checked before any image is embedded
        ranks = ranks if ranks is not None else Ranks.of_process_group()
        plugins = plugins or get_plugins()
        if isinstance(dataset, str):
            entry = plugins.datasets.get(dataset)
            try:
                options = entry.options.model_validate(dataset_options or {})
            except ValidationError as exc:
                raise api_error(exc, "dataset_options", show_input=True, api="evaluate_model") from None
            data, label = entry.factory(options), dataset
        else:
            data, label = dataset, dataset.name
        eval_split = eval_split or ("val" if "val" in data.splits else "test")
        for split in (fit_split, eval_split):
            if split not in data.splits:
                raise SSLBenchError(
                    f"evaluate_model: dataset '{label}' has no split '{split}'; it has: {', '.join(data.splits)}"
                )
        backbone = _InMemoryModel(unwrapped(model), transform if transform is not None else imagenet_eval_transform())
        device = _model_device(model)
        try:  # the spec's extraction options, validated as a spec's are
            extraction = ExtractionSpec.model_validate(
                {
                    "batch_size": _plain(batch_size),
                    "workers": _plain(workers),
                    "amp": _plain(amp),
                    "cpu_memory_format": cpu_memory_format,
                    "cpu_precision": cpu_precision,
                }
            )
        except ValidationError as exc:
            raise api_error(exc, "", show_input=True, api="evaluate_model") from None
        owner = f"evaluate_model's model ({name})"
        settings = resolved_settings(backbone, ExtractionSettings.of(extraction, owner), device)
        started = time.perf_counter()
        with run_scratch(Path(scratch_dir) if scratch_dir is not None else None) as scratch:
            use_rank_zero_state(backbone.model, ranks)
            extracted: dict[str, Extracted | None] = {}
            for index, split in enumerate(dict.fromkeys((fit_split, eval_split))):
                key = CacheKey(
                    backbone=name,
                    plugin={},
                    backbone_options={},
                    backbone_fingerprint={},
                    dataset=label,
                    dataset_options={},
                    split=split,
                    split_fingerprint=f"in-memory-{index}",
                )
                where = f"{label}/{split} ({name})"
                if ranks.distributed:
                    extracted[split] = extract_across_ranks(
                        backbone,
                        data.splits[split],
                        ranks=ranks,
                        settings=settings,
                        device=device,
                        name=where,
                        key=key,
                        scratch=scratch / f"features-{index}",
                    )
                else:
                    entry = FeatureCache(scratch / f"features-{index}").entry(key)
                    extracted[split] = extract_split(
                        backbone, data.splits[split], settings=settings, device=device, name=where, entry=entry
                    )
            outcome: Results | BaseException | None = None
            if ranks.rank == 0:  # rank 0 holds every split; the others wait for its results
                try:
                    outcome = _scored(
                        extracted,
                        fit_split=fit_split,
                        eval_split=eval_split,
                        n_classes=data.num_classes if data.labeled else None,
                        labeled=data.labeled,
                        name=name,
                        label=label,
                        plugins=plugins,
                        scratch=scratch,
                        emit=emit,
                        protocol=protocol,
                        settings=settings,
                        device=device,
                        started=started,
                    )
                except Exception as exc:
                    if not ranks.distributed:
                        raise
                    outcome = picklable(exc)  # the other ranks raise it too, rather than wait forever
            outcome = ranks.broadcast_object(outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, Results)
        return outcome


def _scored(
    extracted: Mapping[str, Extracted | None],
    *,
    fit_split: str,
    eval_split: str,
    n_classes: int | None,
    labeled: bool,
    name: str,
    label: str,
    plugins: Plugins,
    scratch: Path,
    emit: Emit,
    protocol: Mapping[str, Any],
    settings: ExtractionSettings,
    device: str,
    started: float,
) -> Results:
    """evaluate_model's results: :func:`evaluate_features` on the extracted splits, recording the
    dataset, the splits' names and how they were extracted."""
    fit, scored = extracted[fit_split], extracted[eval_split]
    assert fit is not None and scored is not None
    results = evaluate_features(
        fit.features,
        fit.labels if labeled else None,
        scored.features,
        scored.labels if labeled else None,
        n_classes=n_classes,
        model=name,
        dataset=label,
        plugins=plugins,
        scratch_dir=scratch,
        emit=emit,
        fit_split=fit_split,
        eval_split=eval_split,
        **protocol,
    )
    spec = {**(results.spec or {}), "api": "evaluate_model", "dataset": label, "fit_split": fit_split}
    spec["eval_split"] = eval_split
    records = [
        ExtractionRecord(
            model=name,
            dataset=label,
            split=split,
            device=device,
            memory_format=settings.memory_format,
            precision=forward_precision(settings, device),
            decode=settings.decode,
            precision_check=got.precision_check,
        )
        for split, got in extracted.items()
        if got is not None
    ]
    update = {"spec": spec, "wall_s": time.perf_counter() - started, "extraction": records}
    return results.model_copy(update=update)

"""The Python API: what an SSL paper calls from its own eval suite or training loop.

:func:`evaluate_features` runs the same stages as ``sslbench run`` (:mod:`sslbench.pipeline`) on
features in memory or memory-mapped on disk; :func:`evaluate_model` first extracts them with a model
in memory. Both return the same typed :class:`Results`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from sslbench.cache import CacheKey, FeatureCache, run_scratch
from sslbench.errors import SSLBenchError
from sslbench.events import Emit, ignore
from sslbench.extract import resolve_device
from sslbench.inputs import FeatureSplit, checked_split, class_index
from sslbench.interfaces import Backbone, Dataset
from sslbench.pipeline import plan_protocol, run_probes, run_protocol
from sslbench.plugins import Plugins, get_plugins
from sslbench.results import ExtractionRecord, Results, build_results, environment
from sslbench.spec import ProbeSpec, ProtocolSpec, ResolvedProbe


def evaluate_features(
    train_features: Any,
    train_labels: Any,
    eval_features: Any,
    eval_labels: Any,
    *,
    n_clusters: int | None = None,
    overcluster: float | Sequence[float] = 1.0,
    pca_dim: int | Sequence[int | None] | None = None,
    whiten: bool = False,
    epochs: int | None = None,
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
) -> Results:
    """Cluster precomputed features with the paper's protocol and score them.

    PCA and k-means are fitted on the train features; the eval features are predicted and scored
    with the cluster → class assignment built on the train split. Every metric is computed per seed
    and summarised as mean ± sample std.

    Inputs follow one contract (the same as the ``features`` dataset of a spec): features are a
    non-empty 2-D array of a floating or integer dtype, finite, of largest magnitude between 2^-100 and
    2^100 (or all zero); labels are non-negative integers (any integer dtype, or whole-number floats).
    Integer parameters may be NumPy integers, and ``seeds`` or ``pca_dim`` NumPy arrays.

    :param train_features: ``(n_train, d)`` array (a ``np.memmap`` is read in chunks).
    :param train_labels: ``(n_train,)`` integer class indices.
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
    :returns: :class:`~sslbench.results.Results` with ``runs`` (per seed) and ``summary``.
    :raises SSLBenchError: unusable input (a dtype, shape or value outside the contract, NaN/inf,
        mismatched shapes, k larger than the train set, an unknown device), in one line.
    """
    started = time.perf_counter()
    plugins = plugins or get_plugins()
    try:
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
        # Left out, a field is the preset's: only the values given override it.
        chosen = ProtocolSpec.model_validate({key: value for key, value in given.items() if value is not None})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"][:1])
        raise SSLBenchError(f"evaluate_features: {field}: {err['msg']} (got {err.get('input')!r})") from None
    train = checked_split("train", train_features, train_labels)
    eval_ = checked_split("eval", eval_features, eval_labels)
    if n_classes is None:
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
            raise _first_error(exc, f"probes[{index}]", show_input=False) from None
        try:
            entry = plugins.probes.get(spec.id)
        except SSLBenchError as exc:
            raise SSLBenchError(f"evaluate_features: probes[{index}].id: {exc}") from None
        try:
            options = entry.options.model_validate(spec.options)
        except ValidationError as exc:
            raise _first_error(exc, f"probes[{index}].options", show_input=True) from None
        probe = ResolvedProbe(entry, options)
        taken = [name for earlier in resolved for name in earlier.metrics() if name in probe.metrics()]
        if taken:
            raise SSLBenchError(
                f"evaluate_features: probes[{index}]: metric '{taken[0]}' is recorded by an earlier probe"
            )
        resolved.append(probe)
    return tuple(resolved)


def _first_error(exc: ValidationError, at: str, show_input: bool) -> SSLBenchError:
    """``evaluate_features: <at>.<field>: <message>`` for the first error of ``exc`` (with the value given)."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    shown = f" (got {err.get('input')!r})" if show_input else ""
    return SSLBenchError(f"evaluate_features: {at}{'.' + where if where else ''}: {err['msg']}{shown}")


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


#: What ``device`` may be: as a spec's ``device``.
DEVICES = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _checked_device(device: Any) -> str:
    if not isinstance(device, str) or not DEVICES.match(device):
        raise SSLBenchError(
            f"evaluate_features: device: {device!r} is not a device; valid devices: auto, cpu, cuda, cuda:N, mps"
        )
    import torch

    if device.startswith("cuda:") and torch.cuda.is_available() and int(device[5:]) >= torch.cuda.device_count():
        raise SSLBenchError(
            f"evaluate_features: device: {device!r} but torch sees {torch.cuda.device_count()} CUDA GPU(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise SSLBenchError("evaluate_features: device: 'mps' but torch sees no Apple GPU; use auto or cpu")
    return device


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

    :param model: a ``torch.nn.Module`` (put in eval mode while features are extracted, its training
        mode restored after; never moved: batches go to the device of its parameters) or any callable
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
    :param protocol: every keyword :func:`evaluate_features` takes for the protocol (``n_clusters``,
        ``overcluster``, ``pca_dim``, ``epochs``, ``seeds``, ``backend``, ``probes`` …).
    :returns: the results; ``spec`` records ``{"api": "evaluate_model", "dataset": …}``.

    Features go to a scratch folder removed at the end (nothing is cached: a model being trained
    changes between calls). The C allocator's settings of this process are left as they are; a program
    that extracts on the CPU gains from calling :func:`sslbench.allocator.tune_allocator` once (see its
    notes).
    """
    import torch

    from sslbench.extract import ExtractionSettings, extract_split, forward_precision, resolved_settings

    plugins = plugins or get_plugins()
    if isinstance(dataset, str):
        entry = plugins.datasets.get(dataset)
        try:
            options = entry.options.model_validate(dataset_options or {})
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"])
            raise SSLBenchError(f"evaluate_model: dataset_options.{field}: {err['msg']}") from None
        data, label = entry.factory(options), dataset
    else:
        data, label = dataset, dataset.name
    eval_split = eval_split or ("val" if "val" in data.splits else "test")
    for split in (fit_split, eval_split):
        if split not in data.splits:
            raise SSLBenchError(
                f"evaluate_model: dataset '{label}' has no split '{split}'; it has: {', '.join(data.splits)}"
            )
    backbone = _InMemoryModel(model, transform if transform is not None else imagenet_eval_transform())
    device = _model_device(model)
    for option, value, allowed in (
        ("cpu_memory_format", cpu_memory_format, ("auto", "channels_last", "contiguous")),
        ("cpu_precision", cpu_precision, ("float32", "bfloat16")),
    ):
        if value not in allowed:
            raise SSLBenchError(f"evaluate_model: {option}: {value!r} is not one of {', '.join(allowed)}")
    settings = resolved_settings(
        backbone,
        ExtractionSettings(
            batch_size,
            workers,
            amp,
            "fail",
            20,
            owner=f"evaluate_model's model ({name})",
            memory_format=cpu_memory_format,  # type: ignore[arg-type]  # checked above
            precision=cpu_precision,  # type: ignore[arg-type]
        ),
        device,
    )
    training = model.training if isinstance(model, torch.nn.Module) else None
    started = time.perf_counter()
    with run_scratch(Path(scratch_dir) if scratch_dir is not None else None) as scratch:
        try:
            if isinstance(model, torch.nn.Module):
                model.eval()
            extracted = {}
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
                extracted[split] = extract_split(
                    backbone,
                    data.splits[split],
                    settings=settings,
                    device=device,
                    name=f"{label}/{split} ({name})",
                    entry=FeatureCache(scratch / f"features-{index}").entry(key),
                )
        finally:
            if training is not None:
                model.train(training)
        results = evaluate_features(
            extracted[fit_split].features,
            extracted[fit_split].labels,
            extracted[eval_split].features,
            extracted[eval_split].labels,
            n_classes=data.num_classes,
            model=name,
            dataset=label,
            plugins=plugins,
            scratch_dir=scratch,
            emit=emit,
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
    ]
    update = {"spec": spec, "wall_s": time.perf_counter() - started, "extraction": records}
    return results.model_copy(update=update)

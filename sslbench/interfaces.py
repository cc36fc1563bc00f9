"""The objects plugins register and the interfaces they implement.

A plugin registers *entries* (small frozen dataclasses: a name, a factory, an options model and a
description) through the registration hooks in :mod:`sslbench.hookspecs`. The factories build the
working objects defined here: :class:`Backbone`, :class:`Dataset`/:class:`Split`, :class:`Reducer`,
:class:`Clusterer`, the probes' :class:`ProbeData` and :class:`ProbeOutcome`, and :class:`Reporter`.

Feature matrices cross these interfaces as ``numpy`` arrays of shape ``(n_samples, n_features)``.
They may be ``np.memmap`` arrays larger than RAM: implementations read them in row chunks (see
:func:`iter_chunks`) and never call ``np.asarray`` on a whole matrix.
"""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from sslbench.errors import PluginError
from sslbench.protocol import hungarian_mapping
from sslbench.ranks import ONE_PROCESS, Ranks
from sslbench.results import MetricInfo

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from sslbench.cards import ModelCard
    from sslbench.plugins import Plugins
    from sslbench.results import Results

#: Rows per chunk when a matrix is streamed; 16384 × 2048 float32 is 128 MiB.
DEFAULT_CHUNK_ROWS = 16384


def iter_chunks(n_rows: int, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[slice]:
    """Yield consecutive row slices covering ``range(n_rows)``."""
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, n_rows))


class NoOptions(BaseModel):
    """Options model of a component that takes none: any key is rejected."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --------------------------------------------------------------------------------------------------
# Backbones


class Backbone(ABC):
    """A frozen feature extractor.

    The extraction loop calls :meth:`preprocess` on every sample (no augmentation; possibly in
    DataLoader worker processes), stacks the tensors into a batch, and calls :meth:`embed` under
    ``torch.inference_mode`` (on CUDA: channels_last always, float16 autocast when ``amp`` is on).
    An :class:`~sslbench.errors.SSLBenchError` from either is the user's problem (one line, exit 2);
    any other exception is a bug in the plugin: the run stops with its traceback (exit 1).
    The runner builds one backbone at a time and drops every reference to it before building the
    next, so a backbone should hold its weights only through its own attributes.
    """

    #: Dimension of the features :meth:`embed` returns, or ``None`` when it depends on the input.
    feature_dim: int | None = None

    @abstractmethod
    def preprocess(self, sample: Any) -> torch.Tensor:
        """Turn one dataset sample (a PIL image or a numpy array) into the model's input tensor."""

    @abstractmethod
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Map a batch of preprocessed inputs to an ``(n, feature_dim)`` float tensor."""

    def to(self, device: str) -> Backbone:
        """Move the model to ``device``; backbones without parameters need not override this."""
        return self

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this model's features beyond its name, its options and its plugin's
        distribution and version (all three already in the feature-cache key).

        Put in it everything else that changes the features: the weights file's hash, the
        preprocessing (sizes, interpolation, mean and std), a pooling read from a config file. Keep
        out what does not (paths, device, batch size): it would re-extract for nothing. When a fix
        changes the features without a new release of the plugin, bump a ``"revision"`` value here.
        Must be JSON-serialisable and cheap (it is called once per split and run).
        """
        return {}

    def torch_modules(self) -> list[Any]:
        """The ``torch.nn.Module`` objects inside: extraction sets them channels_last on CUDA, and on the
        CPU runs channels-last batches when they hold more than one 2-D convolution (a convolutional
        network; see ``extraction.cpu_memory_format``)."""
        return []

    def embed_array(self, array: np.ndarray) -> np.ndarray | None:
        """Features of a whole split given as one array, when the model can skip the batch loop.

        Return ``None`` (the default) to be fed sample by sample.
        """
        return None

    def decode_side(self) -> int | None:
        """The shorter side an image needs for :meth:`preprocess` to only shrink it (e.g. the resize
        of a resize-and-crop), or ``None`` (the default) when that cannot be said.

        With ``extraction.decode: reduced`` a JPEG is decoded at a reduced DCT scale down to this
        side (see :meth:`Split.reduced_sample`); ``None`` keeps the full decode for this model.

        .. versionadded:: 0.1
        """
        return None


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone a spec can name under ``models[].id``."""

    name: str
    factory: Callable[[Any], Backbone]
    family: str
    description: str
    options: type[BaseModel] = NoOptions
    feature_dim: int | None = None
    weights: str = "none"
    #: The model card behind it, for backbones described by one (see :mod:`sslbench.cards`).
    card: ModelCard | None = None


# --------------------------------------------------------------------------------------------------
# Datasets


class Split(ABC):
    """One split of a dataset: samples in a fixed order, and their integer class labels."""

    @property
    @abstractmethod
    def labels(self) -> np.ndarray:
        """Class index of every sample, ``int64`` of shape ``(len(self),)``; in a dataset without
        classes, :data:`sslbench.inputs.NO_LABEL` (-1) for every sample."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Any:
        """The sample at ``index``: a PIL image, or a numpy array for array datasets."""

    def as_array(self) -> np.ndarray | None:
        """All samples as one ``(n, ...)`` array when the split is held as one (else ``None``)."""
        return None

    def reduced_sample(self, index: int, min_side: int) -> Any:
        """The sample at ``index``, decoded at a reduced scale where its format allows it, its shorter
        side still at least ``min_side``: what ``extraction.decode: reduced`` reads (an approximation
        of ``self[index]``: JPEG's DCT scaling, see :func:`sslbench.imaging.load_rgb`). The default
        is ``self[index]``.

        .. versionadded:: 0.1
        """
        return self[index]

    def describe(self, index: int) -> str:
        """How to name sample ``index`` in a message: its file path where it has one."""
        return f"sample {index}"

    def fingerprint(self) -> str:
        """A digest of what the split holds (its file list), part of the feature-cache key.

        The default hashes the number of samples and the labels; splits read from files override
        it with a hash of their relative file names and labels (no file is opened or stat-ed), so a
        changed file list is re-extracted. It is computed once per split per run.
        """
        digest = hashlib.sha256(str(len(self)).encode())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class Dataset:
    """A dataset: class names and named splits. One without classes (``classes`` empty) has no labels:
    its splits are clustered and given the label-free scores only."""

    name: str
    classes: Sequence[str]
    splits: Mapping[str, Split]
    description: str = ""
    #: Dataset-specific facts for later stages. Keys the protocol reads: ``class_groups``
    #: (group name → class indices: ACC is also reported per group as ``acc_<group>``) and any key a
    #: spec's ``transfer[].class_map`` names (per class of this dataset, the classes of the dataset
    #: the clusters were fitted on that it maps onto; ObjectNet's ``imagenet_classes``).
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset a spec can name under ``datasets[].id``."""

    name: str
    factory: Callable[[Any], Dataset]
    description: str
    options: type[BaseModel] = NoOptions
    #: Whether the dataset these (validated) options load has class labels, said without loading it,
    #: so that ``sslbench validate`` refuses what needs labels on data without; ``None``: always.
    labeled: Callable[[Any], bool] | None = None


# --------------------------------------------------------------------------------------------------
# Backends: the protocol's PCA and k-means steps


class Reducer(ABC):
    """Dimensionality reduction fitted once per feature set and truncated per protocol point.

    The protocol fits one reducer on the train features, then projects every split **chunk by
    chunk** through :meth:`project` and writes the projections to memory-mapped files, so no
    projected matrix is ever whole in memory. Reducers whose components are nested, as PCA's are,
    serve every ``pca_dims`` value of a sweep from one fit.
    """

    @abstractmethod
    def fit(self, features: np.ndarray) -> None:
        """Fit on ``features`` (possibly a memmap larger than RAM), reading it in row chunks
        (see :class:`sslbench.arrays.RowReader`)."""

    @property
    @abstractmethod
    def n_components(self) -> int:
        """Number of components available after :meth:`fit`."""

    @abstractmethod
    def project(self, rows: np.ndarray, n_components: int, whiten: bool) -> np.ndarray:
        """Project one chunk of rows (a contiguous ``(m, d)`` float array: float32, or float64 when the
        features are) onto the leading ``n_components`` components; returns float32
        ``(m, n_components)``.

        The protocol has checked ``1 <= n_components <= self.n_components``; it calls this once per
        chunk of at most :data:`DEFAULT_CHUNK_ROWS` rows, in row order.
        """


@dataclass(frozen=True)
class ReducerConfig:
    """What the protocol tells a backend's PCA factory; ``options`` is the spec's
    ``protocol.backend_options`` validated by the backend's options model."""

    device: str = "cpu"
    options: BaseModel = field(default_factory=NoOptions)
    #: Called with the number of rows consumed as fitting proceeds (progress display only).
    on_rows: Callable[[int], None] | None = None


@dataclass(frozen=True)
class ClustererConfig:
    """What the protocol tells a backend's k-means factory.

    ``options`` is the spec's ``protocol.backend_options`` validated by the backend's options model
    (the same instance the PCA factory receives).
    """

    n_clusters: int
    epochs: int
    batch_size: int
    seed: int
    device: str = "cpu"
    options: BaseModel = field(default_factory=NoOptions)
    #: Called after every epoch (progress display only).
    on_epoch: Callable[[], None] | None = None
    #: The processes the fit is split across: each passes ``fit`` its contiguous shard of the rows, in
    #: rank order. The protocol always hands one process every row (:data:`~sslbench.ranks.ONE_PROCESS`);
    #: other ranks come only from a backend's direct users, to a backend that splits fits (``torch``).
    ranks: Ranks = ONE_PROCESS
    #: The protocol's k-means choices (``protocol.algorithm``, ``n_init``, ``max_iter``, ``tol``): the
    #: backend runs them or its entry refuses them (:meth:`BackendEntry.refusal`).
    algorithm: str = "minibatch"
    n_init: int = 1
    max_iter: int = 300
    tol: float = 1e-4


class Clusterer(ABC):
    """A k-means-style clusterer: fit on train features, then assign any features to clusters.

    Inputs are the protocol's projections: float32 ``np.memmap`` files that may be larger than RAM.
    Read them in row chunks or gathers (:class:`sslbench.arrays.RowReader`); a backend that needs a
    whole matrix in memory must check that it fits and otherwise raise
    :class:`~sslbench.errors.SSLBenchError` saying so in one line.
    """

    @abstractmethod
    def fit(self, features: np.ndarray) -> None:
        """Fit the cluster model on ``features``; every random choice comes from the config's seed."""

    @abstractmethod
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Cluster index of every row, ``int64`` in ``[0, n_clusters)``, computed in row chunks."""


@dataclass(frozen=True)
class BackendEntry:
    """A PCA + k-means implementation, selected by the spec's ``protocol.backend``.

    ``options`` validates the spec's ``protocol.backend_options`` once; the validated instance
    reaches both factories (:attr:`ReducerConfig.options`, :attr:`ClustererConfig.options`).
    """

    name: str
    pca: Callable[[ReducerConfig], Reducer]
    kmeans: Callable[[ClustererConfig], Clusterer]
    description: str
    options: type[BaseModel] = NoOptions
    #: The ``protocol.algorithm`` values its k-means runs (``minibatch``: the paper's shuffled epochs).
    algorithms: tuple[str, ...] = ("minibatch",)
    #: The algorithms (of ``algorithms``) for which it runs ``protocol.n_init`` restarts, keeping the lowest
    #: inertia; the others run only ``n_init: 1``.
    restarts: tuple[str, ...] = ()

    def refusal(self, algorithm: str, n_init: int) -> str | None:
        """Why this backend cannot run these k-means choices (None: it can)."""
        if algorithm not in self.algorithms:
            return f"backend '{self.name}' runs algorithm {' or '.join(self.algorithms)}, not {algorithm}"
        if n_init > 1 and algorithm not in self.restarts:
            return (
                f"backend '{self.name}' runs one k-means initialisation (n_init 1) with algorithm {algorithm}, "
                f"not n_init {n_init}"
            )
        return None

    @staticmethod
    def steps(config: ClustererConfig) -> tuple[int, str]:
        """``(total, unit)`` of a fit's progress: ``epochs`` epochs of the paper's mini-batch k-means, else
        at most ``max_iter`` iterations per restart."""
        if config.algorithm == "minibatch":
            return config.epochs, "epochs"
        return config.max_iter * config.n_init, "iterations"


# --------------------------------------------------------------------------------------------------
# Metrics


@dataclass(frozen=True)
class ScoringContext:
    """Everything a metric may look at for one run.

    ``train_contingency[c, y]`` counts train samples of class ``y`` in cluster ``c``; likewise
    ``eval_contingency`` for the eval split. Both have shape ``(n_clusters, n_classes)``.
    ``train_assignment`` is the paper's cluster → class mapping built on the train split, computed
    once per run however many metrics use it.
    """

    train_pred: np.ndarray
    train_labels: np.ndarray
    eval_pred: np.ndarray
    eval_labels: np.ndarray
    n_clusters: int
    n_classes: int
    train_contingency: np.ndarray = field(repr=False)
    eval_contingency: np.ndarray = field(repr=False)
    #: The eval split as the k-means saw it (its PCA projection, ``n × dims``), possibly a memory map
    #: larger than RAM: read it in row chunks (:class:`sslbench.arrays.RowReader`). ``None`` outside a
    #: protocol run; label-free scores are then NaN.
    eval_space: np.ndarray | None = field(default=None, repr=False)
    #: The eval split's raw features (``n × d``, possibly memory-mapped), for scores of the
    #: representation itself (RankMe); ``None`` outside a protocol run.
    eval_features: np.ndarray | None = field(default=None, repr=False)
    #: The raw features of the split the clusters were fitted on (``n × d``, possibly memory-mapped), for
    #: RankMe of that split; ``None`` outside a protocol run and in a class group's or transfer's context.
    fit_features: np.ndarray | None = field(default=None, repr=False)
    #: Rows of ``eval_space`` and ``eval_features`` that ``eval_pred`` scores, ascending (a class
    #: group's, a transfer target's mapped classes); ``None``: all of them.
    eval_rows: np.ndarray | None = field(default=None, repr=False)
    #: The run's k-means seed, which also draws the silhouette's sample.
    seed: int = 0
    #: The most rows the silhouette reads (``protocol.silhouette_rows``).
    silhouette_rows: int = 10_000
    #: Values that depend on the scored rows only, not on the clusters (RankMe): shared by every
    #: context of one model × split, so each is computed once however many points and seeds.
    shared: dict[str, float] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def train_assignment(self) -> np.ndarray:
        """Class of every cluster: Hungarian on the train contingency, majority for extra clusters."""
        return hungarian_mapping(self.train_contingency)


@dataclass(frozen=True)
class MetricEntry:
    """A metric computed for every run, and how reports show it.

    Every field after ``description`` says how the value is shown; results.json carries them (its
    ``metrics`` table), so a report rendered where the plugin is not installed shows it the same.
    An invalid one is a :class:`~sslbench.errors.PluginError` when the entry is made.
    """

    name: str
    fn: Callable[[ScoringContext], float]
    #: Column title in every report.
    label: str
    description: str
    #: ``percent``: a fraction in [0, 1], shown × 100; ``raw``: shown as the function returns it.
    unit: Literal["percent", "raw"] = "percent"
    #: Which way the best value of a column lies: the bold (and within-one-std) marks follow it.
    better: Literal["higher", "lower"] = "higher"
    #: Whether it compares the clusters with the class labels (False: a label-free score).
    needs_labels: bool = True
    #: Decimal places shown (of the percent, for ``percent``).
    decimals: int = 2

    def __post_init__(self) -> None:
        _ = self.info  # checks the display fields now, where the plugin registers the entry

    @functools.cached_property
    def info(self) -> MetricInfo:
        """The descriptor results.json records for this metric."""
        try:
            return MetricInfo(
                label=self.label,
                description=self.description,
                unit=self.unit,
                better=self.better,
                needs_labels=self.needs_labels,
                decimals=self.decimals,
            )
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"])
            raise PluginError(f"metric '{self.name}': {field}: {err['msg']} (got {err.get('input')!r})") from None


# --------------------------------------------------------------------------------------------------
# Probes


@dataclass(frozen=True)
class ProbeData:
    """What a probe learns from and scores: one model's raw features of one dataset (no PCA).

    Features are ``(n, d)`` arrays that may be memory-mapped and larger than RAM: read them in row
    chunks (:class:`sslbench.arrays.RowReader`). Labels are ``int64`` class indices below ``n_classes``.
    """

    train_features: np.ndarray
    train_labels: np.ndarray
    eval_features: np.ndarray
    eval_labels: np.ndarray
    n_classes: int
    #: The spec's device, resolved: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    device: str = "cpu"


#: A value a probe records besides its metrics (the linear probe's chosen C).
Detail = float | int | str | bool


@dataclass(frozen=True)
class ProbeOutcome:
    """What one probe run produced.

    :param metrics: metric name → value, exactly the names :attr:`ProbeEntry.metrics` declared.
    :param details: other recorded values (the chosen C), shown in results.json, not as columns.
    :param notes: what the reader must know about the numbers (non-convergence, separable data), one
        line each: stored with the probe and printed when it runs.
    """

    metrics: dict[str, float]
    details: dict[str, Detail] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProbeEntry:
    """An evaluation that learns from the train features' labels and scores the eval split, named by a
    spec's ``probes[].id`` with its ``options``.

    :param metrics: the metrics a run with these (validated) options records, described, in column
        order: ``{"knn_top1_k20": MetricInfo(label="kNN-20"), …}``. Names are unique across probes.
    :param run: the probe itself: returns exactly the metrics ``metrics`` declared.
    :param check: refuses, before any feature is extracted or clustered, options the train split cannot
        satisfy (``check(options, n_train, split_name)``: k larger than train): a one-line
        :class:`~sslbench.errors.SSLBenchError`.
    :param published: the card's published values of this probe's metrics, when they measure the same
        thing: ``published(card, n_classes, options)`` → metric → ``(value as a fraction, source)``.
        Reports show them beside the measured ones, with the difference.
    """

    name: str
    run: Callable[[ProbeData, BaseModel], ProbeOutcome]
    metrics: Callable[[BaseModel], dict[str, MetricInfo]]
    description: str
    options: type[BaseModel] = NoOptions
    check: Callable[[BaseModel, int, str], None] | None = None
    published: Callable[[ModelCard, int, BaseModel], dict[str, tuple[float, str]]] | None = None


# --------------------------------------------------------------------------------------------------
# Reporters


@dataclass(frozen=True)
class ReportContext:
    """What ``sslbench report`` knows besides the results, for reporters that show more than they hold.

    :param run_dirs: the run directories the results were read from, in the order given: each
        directory argument, and the folder of each argument named ``results.json``; a run's saved
        ``predictions/*.npz`` are found there.
    :param plugins: the loaded plugins (model cards give the linear top-1s of Figure 1a); ``None``
        when the caller has none.
    """

    run_dirs: tuple[Path, ...] = ()
    plugins: Plugins | None = None

    @classmethod
    def from_arguments(cls, arguments: Sequence[str | Path], plugins: Plugins | None = None) -> ReportContext:
        """The context of ``sslbench report ARGUMENTS…``: results files and run directories."""
        dirs = []
        for argument in map(Path, arguments):
            folder = argument if argument.is_dir() else argument.parent if argument.name == "results.json" else None
            if folder is not None and folder not in dirs:
                dirs.append(folder)
        return cls(tuple(dirs), plugins)


class Reporter(ABC):
    """Renders a :class:`~sslbench.results.Results` object; every report is a view of results.json.

    A reporter implements :meth:`render`. One that can show more when it knows where the results
    came from (a run directory's saved predictions, the plugins' model cards) also overrides
    :meth:`render_with_context`, which ``sslbench report`` calls; its default is :meth:`render`.
    """

    #: File suffix used when the report is written to disk (``results<suffix>``).
    suffix: str = ".txt"

    @abstractmethod
    def render(self, results: Results) -> str:
        """The report as text."""

    def render_with_context(self, results: Results, context: ReportContext) -> str:
        """The report as text, given the run directories and plugins in ``context``; by default
        the context is not needed and this is :meth:`render`.

        .. versionadded:: 0.1
        """
        return self.render(results)

    def show(self, results: Results, console: Console) -> None:
        """Print the report on a terminal; plain text by default."""
        console.print(self.render(results), markup=False, highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class ReporterEntry:
    """A report format, selected by ``sslbench report --format NAME``."""

    name: str
    reporter: Reporter
    description: str

"""Model cards: what a backbone is, where its weights live and how to read them, as validated data.

Cards are YAML files (``registry/cards/<family>.yaml``, one file per family, installed as
``sslbench_registry/cards``); third-party plugins ship their own files and register them through the
same loader plugins. One pydantic schema, unknown keys rejected, checks every card.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sslbench.errors import SSLBenchError

if TYPE_CHECKING:
    from sslbench.interfaces import Backbone, BackboneEntry


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightSource(_Card):
    """One place the weights can come from; a card lists them in order of preference.

    Every source whose file can already be on this machine (``file``, ``package``, a ``url`` in torch.hub's
    checkpoint cache, an ``hf`` or ``timm`` file in the Hugging Face cache) is looked at before anything is
    downloaded; downloads follow in the card's order.
    """

    kind: Literal["url", "hf", "timm", "package", "file", "manual"] = Field(
        description="url: a download into torch.hub's checkpoint cache; hf: a file of a Hugging Face hub "
        "repository, read from the Hugging Face cache and downloaded into it only when absent; timm: timm's "
        "pretrained file of `timm_name` (the Hugging Face repository or URL its pretrained config names); "
        "package: a file an installed Python package ships; file: a local path; manual: instructions only"
    )
    url: str | None = Field(None, description="kind url: direct download address")
    repo: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
        description="kind hf: the Hugging Face hub repository 'owner/name'; timm's mirror of a model is its "
        "pretrained config's hf_hub_id, e.g. timm/vit_small_patch16_224.dino",
    )
    revision: str | None = Field(None, description="kind hf: a branch, tag or commit of the repository (default main)")
    file_name: str | None = Field(
        None,
        description="url: name in the torch.hub cache; package: file in the folder; hf: the file in the repository "
        "(default: model.safetensors, else pytorch_model.bin, the order timm tries them)",
    )
    hub: str | None = Field(None, description="torch.hub reference 'owner/repo:commit entry' (provenance)")
    timm_name: str | None = Field(None, description="kind timm: 'arch.tag' whose pretrained file to fetch")
    package: str | None = Field(
        None, description="kind package: 'module:callable' returning the file (or its folder, with file_name)"
    )
    path: str | None = Field(None, description="kind file: a local path")
    instructions: str | None = Field(None, description="kind manual: how to obtain the file by hand")
    layout: Layout | None = Field(
        None,
        description="how this source's file becomes the architecture's state dict when it differs from the card's "
        "`layout` (timm's mirror holds the model's own keys where the original file may wrap them); default: the "
        "card's layout",
    )
    hash: WeightsHash | None = Field(
        None,
        description="the digest of this source's file; default: the card's `hash`, except for kind hf, a conversion "
        "with its own digest: when none is pinned, the file's sha256 must equal its blob name in the Hugging Face "
        "cache (the hub's LFS etag)",
    )

    @model_validator(mode="after")
    def _fields_for_kind(self) -> WeightSource:
        needed = {
            "url": "url",
            "hf": "repo",
            "timm": "timm_name",
            "package": "package",
            "file": "path",
            "manual": "instructions",
        }
        if getattr(self, needed[self.kind]) is None:
            raise ValueError(f"a '{self.kind}' weight source needs `{needed[self.kind]}`")
        return self


class WeightsHash(_Card):
    """A published digest of a weights file."""

    kind: Literal["sha256", "sha256-prefix", "md5-prefix", "none"] = Field(
        description="sha256: the whole hex digest; sha256-prefix, md5-prefix: its leading hex digits (as release "
        "file names carry them); none: nothing published to check"
    )
    value: str | None = Field(None, description="the hex digest or its prefix")


class Layout(_Card):
    """How the checkpoint's state dict becomes the architecture's."""

    top_level_key: str | None = Field(None, description="the dict inside the file holding the weights")
    keep_prefixes: list[str] | None = Field(None, description="keep only keys starting with one of these")
    strip_prefixes: list[str] = Field(default_factory=list, description="removed from the start of keys")
    drop: list[str] = Field(default_factory=list, description="glob patterns of keys to discard")
    match: Literal["by_name", "by_position"] = Field(
        "by_name",
        description="by_position: pair keys in order (same count, shapes and last name part required)",
    )
    allowed_missing: list[str] = Field(default_factory=list, description="model keys the file may lack")
    allowed_unexpected: list[str] = Field(default_factory=list, description="file keys the model may lack")


class Architecture(_Card):
    source: Literal["timm", "timm-resnet", "simclrv2", "tfhub"]
    name: str = Field(description="timm model name, a label for timm-resnet and simclrv2, a TF-Hub handle for tfhub")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the builder")
    num_classes: int = Field(0, ge=0, description="classifier outputs kept (0: pooled features only)")


class Preprocessing(_Card):
    resize: int = Field(ge=1, description="shorter side resized to this")
    crop: int = Field(ge=1, description="centre crop size")
    interpolation: Literal["bilinear", "bicubic"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Feature(_Card):
    kind: Literal["pooled"] = "pooled"
    dim: int = Field(ge=1)
    pool: Literal["default", "cls", "mean", "cls+mean"] = Field(
        "default",
        description="default: timm's pre-logits; cls, mean (patch tokens; class and register tokens skipped) or "
        "cls+mean (twice the width) of forward_features' tokens, e.g. for a family's linear-probe convention",
    )


class Reference(_Card):
    value: float
    source: str


class MeanStd(_Card):
    mean: float
    std: float


class PaperMetrics(_Card):
    """The paper's Table 1 row for this exact model, in percent."""

    row: str
    linear: float | None = Field(None, description="the linear top-1 the paper quoted for the row")
    acc: MeanStd
    ari: MeanStd
    ami: MeanStd
    nmi: MeanStd
    overcluster: float = 1.0


class ModelCard(_Card):
    id: Annotated[str, Field(pattern=r"^[a-z0-9_]+\.[a-z0-9_]+$", description="timm-style arch.tag")]
    family: str
    loader: str = Field("pytorch", description="the plugin that builds it (pytorch, simclrv2, …)")
    version: int = Field(1, ge=1, description="bumped when weights or preprocessing change")
    description: str
    architecture: Architecture
    weights: list[WeightSource] = Field(min_length=1)
    hash: WeightsHash
    layout: Layout = Field(default_factory=Layout)
    feature: Feature
    preprocessing: Preprocessing
    linear_top1: Reference | None = Field(None, description="top-1 belonging to this exact file")
    knn_top1: Reference | None = Field(
        None, description="published 20-NN top-1 of this exact file, DINO protocol (ImageNet val)"
    )
    paper: list[PaperMetrics] = Field(default_factory=list)
    license: str
    notes: str | None = None

    @model_validator(mode="after")
    def _known_silent_failures(self) -> ModelCard:
        problem = silent_failure(self)
        if problem:
            raise ValueError(problem)
        return self


def _openai_weights(card: ModelCard) -> bool:
    return card.id.endswith(".openai") or any(
        (w.timm_name or "").endswith(".openai") or (w.repo or "").endswith(".openai") or "openaipublic" in (w.url or "")
        for w in card.weights
    )


def silent_failure(card: ModelCard) -> str | None:
    """Why the card would load without error yet compute the wrong function (None: no known trap).

    Checked when a card is read, because strict loading cannot see these: the weight shapes are the same.
    """
    arch = card.architecture
    quick_gelu = "quickgelu" in arch.name or arch.args.get("act_layer") == "quick_gelu"
    if _openai_weights(card) and "_clip_" in arch.name and not quick_gelu:
        return (
            f"{card.id}: OpenAI CLIP weights were trained with QuickGELU; architecture {arch.name} uses GELU "
            "(use the _clip_quickgelu_ variant)"
        )
    if card.family == "mocov3" and arch.name.startswith("vit_small") and arch.args.get("num_heads") != 12:
        return (
            f"{card.id}: MoCo v3 ViT-S has 12 attention heads, timm's {arch.name} has 6 with the same weight "
            "shapes: set architecture.args.num_heads: 12"
        )
    return None


class CardFile(_Card):
    family: str
    cards: list[ModelCard]


def cards_root() -> Path:
    from sslbench.bundled import registry_root

    return registry_root() / "cards"


#: libyaml's loader when PyYAML was built with it (tens of times faster than the pure-Python one).
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_card_file(path: Path) -> list[ModelCard]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)  # a safe loader: no Python objects
    except (OSError, yaml.YAMLError) as exc:
        raise SSLBenchError(f"cannot read model card file {path}: {exc}") from None
    try:
        card_file = CardFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SSLBenchError(f"{path}: {where}: {err['msg']}") from None
    for card in card_file.cards:
        if card.family != card_file.family:
            raise SSLBenchError(f"{path}: card {card.id} has family {card.family}, file says {card_file.family}")
    return card_file.cards


def load_cards(folder: Path | None = None) -> list[ModelCard]:
    """Every card in ``folder`` (default: the bundled registry), ids unique.

    Parsed once per process for the same files (every card loader plugin asks), and again only when
    a file's size or modification time changed.
    """
    folder = folder or cards_root()
    files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.yaml")))
    return list(_parsed_cards(files))


@functools.lru_cache(maxsize=8)
def _parsed_cards(files: tuple[tuple[str, int, int], ...]) -> tuple[ModelCard, ...]:
    cards: list[ModelCard] = []
    seen: dict[str, Path] = {}
    for name, _, _ in files:
        path = Path(name)
        for card in load_card_file(path):
            if card.id in seen:
                raise SSLBenchError(f"model card {card.id} is defined in both {seen[card.id]} and {path}")
            seen[card.id] = path
            cards.append(card)
    return tuple(cards)


def backbone_entries(
    loader: str,
    build: Callable[[ModelCard, Any], Backbone],
    options: type[BaseModel],
    weights: Callable[[ModelCard], str],
    cards: Sequence[ModelCard] | None = None,
) -> list[BackboneEntry]:
    """One backbone entry per card (default: the bundled registry's) whose ``loader`` is ``loader``,
    named by the card's id; ``build(card, options)`` makes the backbone, ``weights(card)`` says where
    its weights come from."""
    from sslbench.interfaces import BackboneEntry

    entries = []
    for card in load_cards() if cards is None else cards:
        if card.loader != loader:
            continue

        def factory(validated: Any, _card: ModelCard = card) -> Backbone:
            return build(_card, validated)

        entries.append(
            BackboneEntry(
                card.id,
                factory,
                family=card.family,
                description=card.description,
                options=options,
                feature_dim=card.feature.dim,
                weights=weights(card),
                card=card,
            )
        )
    return entries


def cards_from(source: Any, where: str = "cards") -> list[ModelCard]:
    """A third party's cards: every ``*.yaml`` card file of a folder (a path, or the
    ``importlib.resources.files(...)`` of a package folder), or a sequence of card mappings given in
    code; each validated by the schema, one-line errors naming ``where``."""
    if isinstance(source, str | Path) or hasattr(source, "iterdir"):
        folder = Path(str(source))
        if not folder.is_dir():
            raise SSLBenchError(f"{where}: card folder not found: {folder}")
        return load_cards(folder)
    cards = []
    for index, item in enumerate(source):
        if isinstance(item, ModelCard):
            cards.append(item)
            continue
        try:
            cards.append(ModelCard.model_validate(dict(item)))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"])
            raise SSLBenchError(f"{where}[{index}]: {field}: {err['msg']}") from None
    return cards

"""Model cards: what a backbone is, where its weights live and how to read them, as validated data.

Cards are YAML files, one per family (``registry/cards/<family>.yaml``, installed as
``sslbench_registry/cards``): a folder of card files is read whole (every ``*.yaml`` in it, not its
subfolders), and a card id is unique across the folder. A third-party package ships its own folder
and registers it through :func:`~sslbench_plugins.pytorch_zoo.card_backbones`; the folder, and any
weights file it ships, must be declared package data, or the installed plugin fails with "card folder
not found". One pydantic schema, unknown keys rejected, checks every card; an error is one line naming
the file and the field.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from sslbench.errors import CardError, SSLBenchError

if TYPE_CHECKING:
    from sslbench.interfaces import Backbone, BackboneEntry


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightSource(_Card):
    """One place the weights can come from; a card lists them in order of preference. Every source whose
    file can already be on this machine (``file``, ``package``, a ``url`` in torch.hub's checkpoint cache,
    an ``hf`` or ``timm`` file in the Hugging Face cache) is looked at before anything is downloaded;
    downloads follow in the card's order. The kinds, each with the key it needs:

    - ``url`` (``url``): downloaded once into the torch.hub checkpoint folder, named ``file_name``
      (default: the URL's last part); a file already there is used without the network.
    - ``hf`` (``repo``): a file of a Hugging Face hub repository (timm's mirror of a model is its
      pretrained config's ``hf_hub_id``), read from the Hugging Face cache and downloaded into it only
      when absent; its own ``layout`` and ``hash`` may differ from the card's.
    - ``timm`` (``timm_name``): the pretrained file timm knows by that ``arch.tag`` (Hugging Face hub or
      timm's URL), in timm's layout.
    - ``package`` (``package``): ``module:callable`` of an installed package returning the file, or its
      folder with ``file_name`` (weights shipped as package data; see ``offline.yaml``).
    - ``file`` (``path``): a file on this machine; a relative path is taken from the folder of the card
      file (a package's card next to its weights), and a card given in code must use an absolute path.
    - ``manual`` (``instructions``): how to obtain the file by hand; the user then passes it as the
      model's ``weights`` option.
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
    path: str | None = Field(
        None, description="kind file: a local path; a relative one is taken from the card file's folder"
    )
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

    @field_validator("path")
    @classmethod
    def _relative_to_the_card_file(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None or Path(path).expanduser().is_absolute():
            return path
        folder = (info.context or {}).get(CARD_FOLDER)
        if folder is None:
            raise PydanticCustomError(
                "relative_path",
                "a relative path needs a card file to be resolved against: give an absolute path, or ship the "
                "card as a YAML file beside its weights",
            )
        return str(Path(folder) / path)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> WeightSource:
        """each kind needs its own key (the list above)"""
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


#: Hex digits a hash prefix has at least: the shortest that release file names carry (torchvision's
#: ``resnet50-19c8e3.pth`` style); one wrong file in 16 million passes it by chance.
MIN_HASH_PREFIX = 6


class WeightsHash(_Card):
    """The digest the weights file must match, checked before it is loaded (a different or corrupted
    file is an error). The kinds:

    - ``sha256``: the file's whole sha256, 64 hex digits.
    - ``sha256-prefix``: the leading hex digits of its sha256, as torch.hub file names carry them
      (``resnet50-0676ba61.pth``).
    - ``md5-prefix``: the leading hex digits of its md5, where the authors publish md5 sums.
    - ``none``: nothing is published to check against (the file's sha256 is still recorded in the
      feature-cache key).
    """

    kind: Literal["sha256", "sha256-prefix", "md5-prefix", "none"] = Field(
        description="sha256: the whole hex digest; sha256-prefix, md5-prefix: its leading hex digits (as release "
        "file names carry them); none: nothing published to check"
    )
    value: str | None = Field(None, description="hex digits (lowercase); required by every kind but none")

    @model_validator(mode="after")
    def _value_for_kind(self) -> WeightsHash:
        """``value``: lowercase hex digits, required by every kind but ``none`` (which has none); 64 for sha256,
        at least 6 for a prefix."""
        if self.kind == "none":
            if self.value is not None:
                raise ValueError("hash kind 'none' takes no value")
            return self
        if not self.value or not re.fullmatch(r"[0-9a-f]+", self.value):
            raise ValueError(f"hash kind '{self.kind}' needs a value of lowercase hex digits")
        if self.kind == "sha256" and len(self.value) != 64:
            raise ValueError(f"a sha256 hash has 64 hex digits, not {len(self.value)} (or use sha256-prefix)")
        if self.kind != "sha256" and len(self.value) < MIN_HASH_PREFIX:
            # A shorter pin matches a wrong file too often to be a check (1 in 16 for one digit).
            raise ValueError(
                f"a {self.kind} value has at least {MIN_HASH_PREFIX} hex digits, not {len(self.value)} "
                "(the shortest release file names carry)"
            )
        return self


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
    """The network the weights go into, built with its random initialisation before they are loaded."""

    source: Literal["timm", "timm-resnet", "simclrv2", "tfhub"] = Field(
        description="timm: timm.create_model(name, **args); timm-resnet: timm's ResNet class with Bottleneck "
        "blocks and args; simclrv2, tfhub: built by those loaders"
    )
    name: str = Field(description="timm model name, a label for timm-resnet and simclrv2, a TF-Hub handle for tfhub")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the builder")
    num_classes: int = Field(0, ge=0, description="classifier outputs kept (0: pooled features only)")


class Preprocessing(_Card):
    """The evaluation transform of the authors: torchvision's Resize (shorter side), CenterCrop, ToTensor,
    Normalize."""

    resize: int = Field(ge=1, description="shorter side resized to this")
    crop: int = Field(ge=1, description="centre crop size")
    interpolation: Literal["bilinear", "bicubic"] = Field(description="the resize filter")
    mean: tuple[float, float, float] = Field(description="per-channel mean (R, G, B) of Normalize")
    std: tuple[float, float, float] = Field(description="per-channel std (R, G, B) of Normalize")


class Feature(_Card):
    """What the backbone returns per image."""

    kind: Literal["pooled"] = Field("pooled", description="one vector per image")
    dim: int = Field(ge=1, description="its width, checked against what the model returns")
    pool: Literal["default", "cls", "mean", "cls+mean"] = Field(
        "default",
        description="default: timm's pre-logits; cls, mean (patch tokens; class and register tokens skipped) or "
        "cls+mean (twice the width) of forward_features' tokens, e.g. for a family's linear-probe convention",
    )


class Reference(_Card):
    """A published number and where it was published."""

    value: float = Field(description="in percent")
    source: str = Field(description="paper, table or repository that gives it")


class MeanStd(_Card):
    """A metric over seeds, in percent."""

    mean: float
    std: float


class PaperMetrics(_Card):
    """The paper's Table 1 row for this exact model, in percent."""

    row: str = Field(description="the row's label in the paper")
    linear: float | None = Field(None, description="the linear top-1 the paper quoted for the row")
    acc: MeanStd
    ari: MeanStd
    ami: MeanStd
    nmi: MeanStd
    overcluster: float = Field(1.0, description="clusters as a multiple of the classes")


#: A card id: timm's ``arch.tag`` style, checked by :data:`CARD_ID_PATTERN` and explained by :data:`CARD_ID_RULE`.
CARD_ID_PATTERN = re.compile(r"[a-z0-9_]+\.[a-z0-9_]+")
CARD_ID_RULE = (
    "two parts joined by one dot, architecture then weights tag, each of lowercase letters, digits and "
    "underscores (e.g. resnet50.mocov2_800ep)"
)
#: The validation-context key holding the folder of the card file being read (relative ``file`` paths).
CARD_FOLDER = "card_folder"


class ModelCard(_Card):
    id: str = Field(description=f"timm-style `arch.tag`: {CARD_ID_RULE}")
    family: str = Field(description="the method; equal to the card file's family")
    loader: str = Field("pytorch", description="the plugin that builds it (pytorch, simclrv2, …)")
    version: int = Field(1, ge=1, description="bumped when weights or preprocessing change")
    description: str = Field(description="one line, shown by `sslbench models`")
    architecture: Architecture
    weights: list[WeightSource] = Field(min_length=1, description="where the file comes from, tried in order")
    hash: WeightsHash
    layout: Layout = Field(default_factory=Layout)
    feature: Feature
    preprocessing: Preprocessing
    linear_top1: Reference | None = Field(None, description="top-1 belonging to this exact file")
    knn_top1: Reference | None = Field(
        None, description="published 20-NN top-1 of this exact file, DINO protocol (ImageNet val)"
    )
    paper: list[PaperMetrics] = Field(default_factory=list, description="the paper's rows for this exact file")
    license: str = Field(description="of the weights")
    notes: str | None = Field(None, description="what a reader of the card should know (provenance, caveats)")

    @field_validator("id")
    @classmethod
    def _id_in_arch_tag_style(cls, value: str) -> str:
        if not CARD_ID_PATTERN.fullmatch(value):
            raise PydanticCustomError("card_id", "not an arch.tag id: " + CARD_ID_RULE)
        return value

    @model_validator(mode="after")
    def _known_silent_failures(self) -> ModelCard:
        """architectures that would load the weights without error yet compute another function are refused
        (OpenAI CLIP weights on a GELU architecture; MoCo v3 ViT-S with timm's 6 heads)"""
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
    """One YAML file of cards: the family's name, then its cards. Every card repeats the family and must
    equal the file's (``card X has family Y, file says Z`` otherwise)."""

    family: str = Field(description="the family of every card in the file")
    cards: list[ModelCard] = Field(description="the cards, each a mapping (fields below)")


def cards_root() -> Path:
    from sslbench.bundled import registry_root

    return registry_root() / "cards"


#: libyaml's loader when PyYAML was built with it (tens of times faster than the pure-Python one).
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _card_ids(data: Any) -> list[str]:
    """The ids of the cards in a card file's data (or a list of card mappings), as far as they can be read."""
    items = data.get("cards") if isinstance(data, dict) else data
    if not isinstance(items, list | tuple):
        return []
    ids = [item.get("id") if isinstance(item, dict) else getattr(item, "id", None) for item in items]
    return [card_id for card_id in ids if isinstance(card_id, str)]


def _schema_errors(exc: ValidationError, source: str, model: type[BaseModel], text: str | None = None) -> str:
    """Every schema error of ``exc`` on one line, as the spec's are (``file:line: field: message; …``, five
    at most, did-you-mean for unknown keys); lines are looked up in ``text`` when it is given."""
    from sslbench.spec import read_yaml, validation_message

    lines: Any = {}
    if text is not None:
        # YAML the spec reader refuses (too deep, too large) gets no line numbers.
        with contextlib.suppress(SSLBenchError):
            lines = read_yaml(text, source)[1]
    return validation_message(exc, source, lines, model)


def load_card_file(path: Path) -> list[ModelCard]:
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_YAML_LOADER)  # a safe loader: no Python objects
    except (OSError, yaml.YAMLError) as exc:
        raise CardError(f"cannot read model card file {path}: {exc}") from None
    try:
        card_file = CardFile.model_validate(data, context={CARD_FOLDER: path.parent.absolute()})
    except ValidationError as exc:
        raise CardError(_schema_errors(exc, str(path), CardFile, text), _card_ids(data)) from None
    mismatched = [card.id for card in card_file.cards if card.family != card_file.family]
    if mismatched:
        raise CardError(
            f"{path}: card(s) {', '.join(mismatched)} name another family than the file's ({card_file.family})",
            _card_ids(data),
        )
    return card_file.cards


def load_cards(folder: Path | None = None) -> list[ModelCard]:
    """Every card in ``folder`` (default: the bundled registry), ids unique.

    Parsed once per process for the same files (every card loader plugin asks), and again only when
    a file's size or modification time changed.
    """
    folder = folder or cards_root()
    files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.yaml")))
    try:
        return list(_parsed_cards(files))
    except CardError as exc:
        # The folder's cards come and go together: every id its files define is what is missing now.
        ids = [card_id for name, _, _ in files for card_id in _readable_ids(Path(name))]
        raise CardError(str(exc), list(dict.fromkeys([*exc.card_ids, *ids]))) from None


def _readable_ids(path: Path) -> list[str]:
    try:
        return _card_ids(yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER))
    except (OSError, yaml.YAMLError):
        return []


@functools.lru_cache(maxsize=8)
def _parsed_cards(files: tuple[tuple[str, int, int], ...]) -> tuple[ModelCard, ...]:
    cards: list[ModelCard] = []
    seen: dict[str, Path] = {}
    for name, _, _ in files:
        path = Path(name)
        for card in load_card_file(path):
            if card.id in seen:
                raise CardError(f"model card {card.id} is defined in both {seen[card.id]} and {path}", list(seen))
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
    items = list(source)
    cards, errors = [], []
    for index, item in enumerate(items):
        if isinstance(item, ModelCard):
            cards.append(item)
            continue
        try:
            cards.append(ModelCard.model_validate(dict(item)))
        except ValidationError as exc:
            errors.append(_schema_errors(exc, f"{where}[{index}]", ModelCard))
    if errors:
        raise CardError("; ".join(errors), _card_ids(items))
    return cards

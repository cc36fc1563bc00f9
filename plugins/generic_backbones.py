"""Generic backbones: any timm model by name, any torch.hub entry point at a pinned commit, any Python callable.

``timm``
    ``timm.create_model(name)`` with timm's own pretrained loading. The weights file is looked up in the
    Hugging Face hub cache first (``huggingface_hub.try_to_load_from_cache``, no network at all), downloaded
    only when downloads are allowed, and handed to timm's loader, which applies the architecture's
    checkpoint filter and loads it as timm does. Preprocessing is timm's own eval transform for the model's
    pretrained config. A local ``weights`` file instead loads strictly through :func:`sslbench.weights.load_state`.
    Two known traps load without error yet change the features, and are refused in one line unless the
    options ``allow`` them (the acceptance is fingerprinted): QuickGELU-trained CLIP weights on timm's GELU
    architecture (:func:`quickgelu_counterpart`), and position embeddings of another grid, which timm's
    checkpoint filter resamples (:func:`resampled_pos_embed`).

``hub``
    ``torch.hub.load`` from the hub cache's checkout ``<owner>_<name>_<sha>`` of a pinned commit, offline.

``python``
    ``pkg.module:callable`` returning a module (or any callable) that maps a batch to features.

Pooling of token outputs (``pool``) never averages the class or register tokens into the patch mean: the
first ``num_prefix_tokens`` tokens (class token, then registers, as timm orders them) are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbench import hookimpl
from sslbench.cards import Layout
from sslbench.errors import SSLBenchError, did_you_mean, exception_line
from sslbench.imaging import SEPARABLE, EvalTransform, rgb
from sslbench.interfaces import Backbone, BackboneEntry
from sslbench.weights import (
    apply_layout,
    downloads_allowed,
    file_digests,
    hf_cached_file,
    hf_candidates,
    hf_download,
    hub_checkpoint_dir,
    load_state,
    read_checkpoint,
)

#: Bumped when a change here alters the features of an unchanged spec (part of every fingerprint).
REVISION = 1

TimmPool = Literal["default", "cls", "mean", "cls+mean", "head"]
#: Ways timm loads weights without an error yet computes another function than the one they were trained
#: as; refused unless the spec's ``allow`` names them.
TimmTrap = Literal["quickgelu_mismatch", "pos_embed_resampled"]
OutputPool = Literal["none", "cls", "mean", "cls+mean"]

_OUTPUT_POOL = (
    "none: the model returns (n, d) features; for (n, tokens, d) outputs: cls (first token), mean (tokens after "
    "prefix_tokens), cls+mean (both, concatenated); mean also averages (n, c, h, w) maps"
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# Shared pieces: images, pooling, digests


def _rgb(sample: Any) -> Any:
    from PIL import Image

    image = sample if isinstance(sample, Image.Image) else Image.fromarray(np.asarray(sample))
    return rgb(image)  # no copy of an RGB image: the transforms never write to their input


def pool_output(out: Any, pool: str, prefix_tokens: int | None, where: str, channels_last: bool = False) -> Any:
    """Pool a model output: ``(n, tokens, d)`` by ``cls`` / ``mean`` / ``cls+mean``, a ``(n, c, h, w)``
    map by ``mean``; ``none`` requires ``(n, d)`` already.

    ``mean`` averages the tokens after the first ``prefix_tokens`` (class and register tokens).
    ``channels_last`` says a 4-d map is ``(n, h, w, c)`` (timm's NHWC models such as Swin).
    """
    import torch

    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if shape is None:
        raise SSLBenchError(f"{where} returned a {type(out).__name__}, not a tensor")
    if pool == "none":
        if len(shape) != 2:
            hint = "cls, mean or cls+mean" if len(shape) == 3 else "mean"
            raise SSLBenchError(f"{where} returns {shape}-shaped outputs, not (n, d): set pool: {hint}")
        return out
    if len(shape) == 4 and pool == "mean":
        return out.mean(dim=(1, 2) if channels_last else (2, 3))
    if len(shape) != 3:
        raise SSLBenchError(f"{where}: pool '{pool}' needs (n, tokens, d) outputs, got {shape}")
    if pool == "cls":
        return out[:, 0]
    assert prefix_tokens is not None
    if shape[1] <= prefix_tokens:
        raise SSLBenchError(f"{where}: {shape[1]} tokens leave no patch token after {prefix_tokens} prefix tokens")
    patches = out[:, prefix_tokens:].mean(dim=1)
    return patches if pool == "mean" else torch.cat([out[:, 0], patches], dim=1)


def state_sha256(module: Any) -> str:
    """sha256 over a module's state dict: every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random initialisation inside the block is drawn from ``seed``; the caller's RNG state is kept."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModuleOptions(_Options):
    """What the hub and python backbones share: the torchvision ImageNet evaluation transform
    (``Resize(resize)`` of the shorter side, ``CenterCrop(crop)``, ``ToTensor``, ``Normalize(mean, std)``)
    and the number of prefix tokens that token pooling skips."""

    resize: int = Field(256, ge=1, description="shorter side resized to this")
    crop: int = Field(224, ge=1, description="centre crop size")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field("bicubic", description="resize filter")
    mean: list[float] = Field(list(IMAGENET_MEAN), min_length=3, max_length=3, description="per-channel mean")
    std: list[float] = Field(list(IMAGENET_STD), min_length=3, max_length=3, description="per-channel std")
    prefix_tokens: int | None = Field(
        None,
        ge=0,
        description="leading non-patch tokens (class + registers) that mean pooling skips; "
        "default: the model's num_prefix_tokens",
    )

    def preprocessing(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
        }


def eval_transform(options: ModuleOptions) -> Any:
    """torchvision's ``Resize`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize``, computed bit for bit by
    :class:`~sslbench.imaging.EvalTransform` where it can (bilinear and bicubic), else torchvision's own."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    if options.interpolation in SEPARABLE:
        return EvalTransform.make(options.resize, options.crop, options.interpolation, options.mean, options.std)
    return transforms.Compose(
        [
            transforms.Resize(options.resize, interpolation=InterpolationMode(options.interpolation)),
            transforms.CenterCrop(options.crop),
            transforms.ToTensor(),
            transforms.Normalize(options.mean, options.std),
        ]
    )


def _decode_side(transform: Any) -> int | None:
    return transform.min_side if isinstance(transform, EvalTransform) else None


def _prefix_tokens(model: Any, options: ModuleOptions, pool: str, where: str) -> int | None:
    if pool not in ("mean", "cls+mean"):
        return options.prefix_tokens
    if options.prefix_tokens is not None:
        return options.prefix_tokens
    found = getattr(model, "num_prefix_tokens", None)
    if isinstance(found, int):
        return found
    raise SSLBenchError(
        f"{where}: pool '{pool}' needs the number of class and register tokens to skip: "
        "set prefix_tokens (the model has no num_prefix_tokens)"
    )


class _ModuleBackbone(Backbone):
    """A module (or callable) whose output is pooled by :func:`pool_output`."""

    model: Any
    pool: str
    prefix: int | None
    where: str

    def to(self, device: str) -> _ModuleBackbone:
        if hasattr(self.model, "to"):
            self.model.to(device)
        return self

    def torch_modules(self) -> list[Any]:
        import torch

        return [self.model] if isinstance(self.model, torch.nn.Module) else []

    def embed(self, batch: Any) -> Any:
        return pool_output(self.model(batch), self.pool, self.prefix, self.where)

    def decode_side(self) -> int | None:
        return _decode_side(getattr(self, "transform", None))


# --------------------------------------------------------------------------------------------------
# timm


def _split_model_name(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, tag or None


class TimmOptions(_Options):
    model: str = Field(description="timm name with its pretrained tag, e.g. vit_small_patch14_dinov2.lvd142m")
    weights: str | None = Field(None, description="a local timm-layout weights file, loaded strictly instead")
    pretrained: bool = Field(True, description="false: the architecture's random initialisation")
    init_seed: int = Field(0, ge=0, description="seed of the random initialisation (pretrained: false)")
    pool: TimmPool = Field(
        "default",
        description="default: timm's pre-logits, the model's own pooling (class token for DINO, DINOv2, MAE, "
        "DINOv3 ViTs; patch average for _gap models; average pool for CNNs); cls; mean (patch tokens, class and "
        "register tokens skipped; spatial mean for CNNs); cls+mean (concatenated); head: the pretrained head's "
        "output (e.g. CLIP's projection)",
    )
    img_size: int | None = Field(None, ge=8, description="input size instead of the pretrained config's")
    allow: list[TimmTrap] = Field(
        default_factory=list,
        description="known traps to accept, recorded in the fingerprint: quickgelu_mismatch (QuickGELU-trained "
        "CLIP weights on timm's GELU architecture), pos_embed_resampled (timm's checkpoint filter resamples the "
        "file's position embeddings to another grid)",
    )

    @model_validator(mode="after")
    def _known_model(self) -> TimmOptions:
        import timm

        if self.weights is not None and not self.pretrained:
            raise ValueError("weights and pretrained: false exclude each other")
        pretrained = timm.list_pretrained()
        if self.model in pretrained:
            return self
        arch, tag = _split_model_name(self.model)
        if (self.weights is not None or not self.pretrained) and timm.is_model(arch):
            return self
        if tag is None and timm.is_model(arch):
            tags = [name for name in pretrained if name.startswith(f"{arch}.")]
            if tags:
                raise ValueError(f"name the weights of {arch} with their tag: {', '.join(tags[:6])}")
        raise ValueError(
            f"timm {timm.__version__} has no pretrained model {self.model}{did_you_mean(self.model, pretrained)}"
        )


def hf_weights_file(model: str, cfg: Any) -> Path:
    """The weights file of timm's ``model`` in the Hugging Face cache, downloaded into it only if allowed."""
    repo_id, revision, names = hf_candidates(cfg)
    found = hf_cached_file(repo_id, revision, names)
    return found if found is not None else hf_download(repo_id, revision, names, f"timm model {model}")


def url_weights_file(model: str, cfg: Any) -> Path:
    """timm's legacy ``url`` source: the torch.hub checkpoint cache, downloaded into it only if allowed."""
    from urllib.parse import urlparse

    from sslbench.weights import download

    url = str(cfg.url)
    name = Path(urlparse(url).path).name
    target = hub_checkpoint_dir() / name
    if target.is_file():
        return target
    if not downloads_allowed.get():
        raise SSLBenchError(
            f"timm model {model}: {name} is not in the torch.hub cache {target.parent} and optional models are "
            f"never downloaded; download {url} into that folder"
        )
    return download(url, name)


#: Architectures whose timm default pooling differs from their authors' evaluation convention.
#: timm's DINOv3 ViTs average the patch tokens by default; upstream DINOv3 uses the class token
#: (timm's own note in timm/models/eva.py).
_CONVENTION: tuple[tuple[re.Pattern[str], dict[str, Any]], ...] = (
    (re.compile(r"^vit_.*_dinov3(_qkvb)?$"), {"global_pool": "token"}),
)


def quickgelu_counterpart(name: str) -> str | None:
    """The name timm gives the same weights on a QuickGELU architecture, when ``name`` puts them on GELU.

    timm registers QuickGELU-trained CLIP weights (OpenAI, LAION-400M, MetaCLIP, DFN) twice, under the GELU
    architecture and its ``_quickgelu`` variant, from one Hugging Face repository: the weight shapes are
    the same, so the GELU one loads without error and computes another function.
    """
    import timm

    arch, tag = _split_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if tag is None or cfg is None or "quickgelu" in arch or not cfg.hf_hub_id:
        return None
    for other in timm.list_pretrained(f"*quickgelu*.{tag}"):
        other_cfg = timm.models.get_pretrained_cfg(other)
        if other_cfg is not None and other_cfg.hf_hub_id == cfg.hf_hub_id:
            return str(other)
    return None


def checkpoint_shapes(path: Path, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors ``names`` in a weights file as timm's loader reads it (its state-dict key, its
    wrapper prefixes removed), before timm's checkpoint filter; tensor data are not read (safetensors
    headers, a memory-mapped ``torch.load``). A name the file holds only under a longer prefix is matched
    by its ending (``visual.trunk.pos_embed`` for ``pos_embed``)."""
    import torch
    from timm.models import clean_state_dict

    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(checkpoint, dict):
            for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm's load_state_dict order
                if isinstance(checkpoint.get(key), dict):
                    checkpoint = checkpoint[key]
                    break
        state = clean_state_dict(checkpoint) if isinstance(checkpoint, dict) else {}
        shapes = {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    found: dict[str, tuple[int, ...]] = {}
    for name in names:
        stored = name if name in shapes else next((k for k in shapes if k.endswith(f".{name}")), None)
        if stored is not None:
            found[name] = shapes[stored]
    return found


def _grid_side(tokens: int, prefix: int) -> int | None:
    """The side of the square patch grid that ``tokens`` position embeddings cover, if they do."""
    side = math.isqrt(max(tokens - prefix, 0))
    return side if side and side * side == tokens - prefix else None


def _grid_text(tokens: int, prefix: int, patch: int | None) -> str:
    side = _grid_side(tokens, prefix)
    if side is None:
        return f"{tokens} tokens"
    return f"{side}×{side} patches" + (f" ({side * patch} px)" if patch else "")


def resampled_pos_embed(model: Any, path: Path, where: str) -> str | None:
    """Why the position embeddings of ``path`` do not fit ``model``'s grid (timm's checkpoint filter then
    resamples them: the features are no longer the checkpoint's own), or None when they fit."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if key.endswith("pos_embed")}
    if not expected:
        return None
    stored = checkpoint_shapes(path, expected)
    patch_size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = int(patch_size[0]) if isinstance(patch_size, tuple | list) and patch_size else None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0) or 0)
    for key, shape in expected.items():
        if len(shape) < 2 or key not in stored or stored[key][-2:] == shape[-2:]:
            continue
        ours, theirs = _grid_text(shape[-2], prefix, patch), _grid_text(stored[key][-2], prefix, patch)
        side = _grid_side(stored[key][-2], prefix)
        fix = f"set img_size: {side * patch}, or " if side and patch else ""
        return (
            f"{where}: {path.name} holds {key} for {theirs} and timm's checkpoint filter resamples it to the "
            f"model's {ours}, which changes the features: {fix}allow: [pos_embed_resampled]"
        )
    return None


class TimmBackbone(Backbone):
    """A timm model; features pooled as ``pool`` says (see :class:`TimmOptions`)."""

    def __init__(self, options: TimmOptions) -> None:
        import timm
        import timm.data

        self.options = options
        name = options.model
        arch, _ = _split_model_name(name)
        self.where = f"timm model {name}"
        cfg = timm.models.get_pretrained_cfg(name)
        kwargs: dict[str, Any] = {}
        if options.img_size is not None and cfg is not None and cfg.fixed_input_size:
            kwargs["img_size"] = options.img_size
        if options.pool == "default":
            for pattern, args in _CONVENTION:
                if pattern.match(arch):
                    kwargs.update(args)
        head_classes = cfg.num_classes if cfg is not None and options.pool == "head" else 0
        self.weights: dict[str, Any]
        #: The traps found and accepted through ``allow`` (name → the refusal it replaced), fingerprinted.
        self.accepted: dict[str, str] = {}
        counterpart = quickgelu_counterpart(name) if options.pretrained else None
        if counterpart is not None:
            self._trap(
                "quickgelu_mismatch",
                f"{self.where}: these weights were trained with QuickGELU and {arch} computes GELU, which changes "
                f"the features: use model: {counterpart}, or allow: [quickgelu_mismatch]",
            )
        with _seeded(options.init_seed):
            if options.weights is not None:
                self.model = self._from_file(Path(options.weights).expanduser(), cfg, head_classes, kwargs)
            elif options.pretrained:
                self.model = self._pretrained(cfg, kwargs)
            else:
                self.model = timm.create_model(name, pretrained=False, num_classes=head_classes, **kwargs)
                self.weights = {"source": "random-init", "init_seed": options.init_seed}
        self.model.eval()
        model = self.model
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.tokens = isinstance(getattr(model, "num_prefix_tokens", None), int)
        self.prefix = model.num_prefix_tokens if self.tokens else 0
        has_cls = getattr(model, "cls_token", None) is not None
        if options.pool in ("cls", "cls+mean") and not has_cls:
            raise SSLBenchError(
                f"{self.where} has no class token: pool '{options.pool}' does not apply (use default or mean)"
            )
        if options.pool == "head" and not model.num_classes:
            raise SSLBenchError(f"{self.where} has no pretrained head (num_classes 0): use pool default")
        width = model.num_features
        self.feature_dim = {
            "default": getattr(model, "head_hidden_size", None),
            "cls": width,
            "mean": width if self.tokens else None,
            "cls+mean": 2 * width,
            "head": model.num_classes,
        }[options.pool]
        config = timm.data.resolve_model_data_config(model)
        if options.img_size is not None:
            config["input_size"] = (config["input_size"][0], options.img_size, options.img_size)
        self.data_config = config
        timm_transform = timm.data.create_transform(**config, is_training=False)
        # timm's own transform, computed bit for bit by EvalTransform when it is the usual resize + crop.
        self.transform = EvalTransform.from_torchvision(timm_transform) or timm_transform
        self.pretrained_cfg = {
            key: getattr(cfg, key, None) for key in ("architecture", "tag", "hf_hub_id", "hf_hub_filename", "url")
        }

    def _pretrained(self, cfg: Any, kwargs: dict[str, Any]) -> Any:
        import timm

        name = self.options.model
        if cfg is not None and cfg.hf_hub_id:
            path, source = hf_weights_file(name, cfg), "hf-hub"
        elif cfg is not None and cfg.url and not cfg.custom_load:
            path, source = url_weights_file(name, cfg), "url"
        else:
            raise SSLBenchError(f"{self.where}: timm has no weights file sslbench can load for it")
        try:
            # timm's own pretrained loading (its file reader with weights_only, the checkpoint filter, the
            # classifier and input checks, its strictness), pointed at the file found above instead of
            # fetching one itself. (A `state_dict` overlay would be deep-copied with timm's config.)
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except RuntimeError as exc:
            if not str(exc).startswith("Error(s) in loading state_dict"):
                raise
            why = " ".join(str(exc).split())[:500]  # torch lists the keys on the lines after a header
            raise SSLBenchError(f"{self.where}: {path} does not fit the architecture: {why}") from None
        resampled = resampled_pos_embed(model, path, self.where)
        if resampled is not None:
            self._trap("pos_embed_resampled", resampled)
        self.weights = {"source": source, "file": path.name, "sha256": file_digests(path)["sha256"]}
        return model

    def _trap(self, trap: str, refusal: str) -> None:
        """Refuse a known trap in one line, unless the options ``allow`` it (then it is fingerprinted)."""
        if trap not in self.options.allow:
            raise SSLBenchError(refusal)
        self.accepted[trap] = refusal

    def _from_file(self, path: Path, cfg: Any, head_classes: int, kwargs: dict[str, Any]) -> Any:
        import timm

        if not path.is_file():
            raise SSLBenchError(f"{self.where}: weights file not found: {path}")
        model = timm.create_model(self.options.model, pretrained=False, num_classes=head_classes, **kwargs)
        # Nothing may be missing or unexpected; a headless model only drops the classifier timm names.
        classifiers = (cfg.classifier if cfg is not None else None) or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        drop = [f"{c}.{part}" for c in classifiers for part in ("weight", "bias")] if not head_classes else []
        where = f"{self.where} ({path})"
        load_state(model, apply_layout(read_checkpoint(path), Layout(drop=drop), where), Layout(), where)
        self.weights = {"source": "file", "sha256": file_digests(path)["sha256"]}
        return model

    def fingerprint(self) -> dict[str, Any]:
        import timm

        return {
            "revision": REVISION,
            "timm": timm.__version__,
            "model": self.options.model,
            "pretrained_cfg": self.pretrained_cfg,
            "weights": self.weights,
            "data_config": self.data_config,
            "pool": self.options.pool,
            "global_pool": str(getattr(self.model, "global_pool", "")),
            "prefix_tokens": self.prefix,
            # Only when a trap was accepted, so that the fingerprints of every other model stay as they were.
            **({"accepted": self.accepted} if self.accepted else {}),
        }

    def to(self, device: str) -> TimmBackbone:
        self.model.to(device)
        return self

    def torch_modules(self) -> list[Any]:
        return [self.model]

    def preprocess(self, sample: Any) -> Any:
        return self.transform(_rgb(sample))

    def decode_side(self) -> int | None:
        return _decode_side(self.transform)

    def embed(self, batch: Any) -> Any:
        pool = self.options.pool
        features = self.model.forward_features(batch)
        if pool in ("default", "head"):
            return self.model.forward_head(features, pre_logits=pool == "default")
        return pool_output(features, pool, self.prefix, self.where, channels_last=self.channels_last)


# --------------------------------------------------------------------------------------------------
# torch.hub

_REPO = re.compile(r"^(?P<owner>[A-Za-z0-9_.-]+)/(?P<name>[A-Za-z0-9_.-]+)(?::(?P<ref>[^:\s]+))?$")
_SHA = re.compile(r"^[0-9a-f]{7,40}$")


class HubOptions(ModuleOptions):
    repo: str = Field(description="owner/name:<commit sha> (7 to 40 hex digits)")
    entry: str = Field(description="entry point of the repository's hubconf.py, e.g. dino_vits16")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the entry point")
    trust_unpinned: bool = Field(False, description="accept a branch, tag or no ref (recorded in the fingerprint)")
    pool: OutputPool = Field("none", description=_OUTPUT_POOL)

    @model_validator(mode="after")
    def _pinned(self) -> HubOptions:
        match = _REPO.match(self.repo)
        if match is None:
            raise ValueError("repo must read owner/name:<commit sha>")
        ref = match["ref"]
        if not (ref and _SHA.match(ref)) and not self.trust_unpinned:
            raise ValueError(
                f"repo {self.repo} is not pinned: write owner/name:<commit sha> "
                "(or set trust_unpinned: true to accept whatever the ref points to)"
            )
        return self


@contextlib.contextmanager
def _hub_downloads_blocked(where: str) -> Iterator[None]:
    """While downloads are not allowed, an entry point that fetches a file fails saying where to put it."""
    import torch.hub

    if downloads_allowed.get():
        yield
        return
    original = torch.hub.download_url_to_file

    def refuse(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        raise SSLBenchError(f"{where} downloads {url} and optional models are never downloaded; put the file at {dst}")

    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = original


class HubBackbone(_ModuleBackbone):
    """``torch.hub.load`` of a cached checkout of a pinned commit; the model's output pooled by ``pool``."""

    def __init__(self, options: HubOptions) -> None:
        import torch
        import torch.hub

        self.options = options
        match = _REPO.match(options.repo)
        assert match is not None
        owner, name, ref = match["owner"], match["name"], match["ref"]
        self.pinned = bool(ref and _SHA.match(ref))
        self.where = f"torch.hub {owner}/{name} entry {options.entry}"
        hub_dir = Path(torch.hub.get_dir())
        refs = [ref] if ref else ["main", "master"]
        folders = [hub_dir / f"{owner}_{name}_{r.replace('/', '_')}" for r in refs]
        folder = next((f for f in folders if f.is_dir()), None)
        with _seeded(0), _hub_downloads_blocked(self.where):
            try:
                if folder is not None:
                    model = torch.hub.load(str(folder), options.entry, source="local", **options.kwargs)
                elif downloads_allowed.get():
                    model = torch.hub.load(
                        f"{owner}/{name}" + (f":{ref}" if ref else ""),
                        options.entry,
                        trust_repo=True,
                        skip_validation=self.pinned,  # a pinned commit need not be a branch head
                        **options.kwargs,
                    )
                    folder = next((f for f in folders if f.is_dir()), None)
                else:
                    raise SSLBenchError(
                        f"{self.where}: the checkout is not in the torch.hub cache and optional models are never "
                        f"downloaded; put the repository at commit {ref} in {folders[0]}"
                    )
            except RuntimeError as exc:
                if not str(exc).startswith("Cannot find callable"):
                    raise
                raise SSLBenchError(f"{self.where}: {exception_line(exc)}") from None
            except OSError as exc:  # network errors of urllib are OSErrors
                raise SSLBenchError(
                    f"{self.where}: cannot fetch the repository or its weights: {exception_line(exc)}"
                ) from None
        if not isinstance(model, torch.nn.Module):
            raise SSLBenchError(f"{self.where} returned a {type(model).__name__}, not a torch.nn.Module")
        self.model = model.eval()
        self.pool = options.pool
        self.prefix = _prefix_tokens(model, options, options.pool, self.where)
        self.transform = eval_transform(options)
        self.hubconf_sha256 = (
            file_digests(folder / "hubconf.py")["sha256"]
            if folder is not None and not self.pinned and (folder / "hubconf.py").is_file()
            else None
        )
        self.state_sha256 = state_sha256(model)

    def fingerprint(self) -> dict[str, Any]:
        found = {
            "revision": REVISION,
            "repo": self.options.repo,
            "pinned": self.pinned,
            "trust_unpinned": self.options.trust_unpinned,
            "entry": self.options.entry,
            "kwargs": self.options.kwargs,
            "preprocessing": self.options.preprocessing(),
            "pool": self.pool,
            "prefix_tokens": self.prefix,
            "state_sha256": self.state_sha256,
        }
        if self.hubconf_sha256 is not None:
            found["hubconf_sha256"] = self.hubconf_sha256
        return found

    def preprocess(self, sample: Any) -> Any:
        return self.transform(_rgb(sample))


# --------------------------------------------------------------------------------------------------
# Python callables

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def import_callable(path: str, what: str) -> Callable[..., Any]:
    """The object at ``pkg.module:attr.attr``; a module that cannot be imported is a one-line error."""
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as exc:
        raise SSLBenchError(f"cannot import the {what} {path}: {exception_line(exc)}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise SSLBenchError(f"the {what} {path}: {module_name} has no attribute {attribute}") from None
    if not callable(target):
        raise SSLBenchError(f"the {what} {path} is a {type(target).__name__}, not a callable")
    return target


class PythonOptions(ModuleOptions):
    factory: str = Field(description="pkg.module:callable building the model (importable from sys.path)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    transform: str | None = Field(
        None, description="pkg.module:callable mapping a sample to a tensor, instead of the ImageNet eval transform"
    )
    pool: OutputPool = Field("none", description=_OUTPUT_POOL)
    revision: str = Field("0", description="bump it when the model's code changes: re-extracts")
    weights: str | None = Field(
        None, description="a file the factory reads (its keyword argument `weights`); its sha256 is fingerprinted"
    )

    @model_validator(mode="after")
    def _paths(self) -> PythonOptions:
        for field in ("factory", "transform"):
            value = getattr(self, field)
            if value is not None and not _IMPORT_PATH.match(value):
                raise ValueError(f"{field} must read pkg.module:callable (got {value})")
        given = {"resize", "crop", "interpolation", "mean", "std"} & self.model_fields_set
        if self.transform is not None and given:
            raise ValueError(f"transform replaces the eval transform: drop {', '.join(sorted(given))}")
        return self


class PythonBackbone(_ModuleBackbone):
    """A model built by a Python callable; ``pool`` pools what it returns."""

    def __init__(self, options: PythonOptions) -> None:
        import torch

        self.options = options
        self.where = f"python model {options.factory}"
        factory = import_callable(options.factory, "factory")
        kwargs = dict(options.kwargs)
        self.weights_sha256 = None
        if options.weights is not None:
            path = Path(options.weights).expanduser()
            if not path.is_file():
                raise SSLBenchError(f"{self.where}: weights file not found: {path}")
            self.weights_sha256 = file_digests(path)["sha256"]
            kwargs["weights"] = str(path)
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as exc:
            raise SSLBenchError(f"{self.where} does not take these arguments: {exc}") from None
        except ValueError:  # no signature to check (some builtins): the call itself will tell
            pass
        with _seeded(0):
            model = factory(**kwargs)
        if not callable(model):
            raise SSLBenchError(f"{self.where} returned a {type(model).__name__}, not a model")
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.model = model
        self.pool = options.pool
        self.prefix = _prefix_tokens(model, options, options.pool, self.where)
        self.transform = (
            import_callable(options.transform, "transform")
            if options.transform is not None
            else eval_transform(options)
        )

    def fingerprint(self) -> dict[str, Any]:
        return {
            "revision": REVISION,
            "factory": self.options.factory,
            "kwargs": self.options.kwargs,
            "model_revision": self.options.revision,
            "weights_sha256": self.weights_sha256,
            "preprocessing": (
                {"transform": self.options.transform} if self.options.transform else self.options.preprocessing()
            ),
            "pool": self.pool,
            "prefix_tokens": self.prefix,
        }

    def preprocess(self, sample: Any) -> Any:
        if self.options.transform is not None:
            return self.transform(sample)
        return self.transform(_rgb(sample))


@hookimpl
def sslbench_register_backbones(register: Callable[[BackboneEntry], None]) -> None:
    register(
        BackboneEntry(
            "timm",
            TimmBackbone,
            family="generic",
            description="any timm model by name.tag; timm's weights (Hugging Face cache) and eval transform",
            options=TimmOptions,
            weights="timm (Hugging Face hub cache) or a local file",
        )
    )
    register(
        BackboneEntry(
            "hub",
            HubBackbone,
            family="generic",
            description="a torch.hub entry point of a repository pinned to a commit, from the torch.hub cache",
            options=HubOptions,
            weights="the entry point's (torch.hub cache)",
        )
    )
    register(
        BackboneEntry(
            "python",
            PythonBackbone,
            family="generic",
            description="a model built by a Python callable (pkg.module:callable)",
            options=PythonOptions,
            weights="the factory's own",
        )
    )

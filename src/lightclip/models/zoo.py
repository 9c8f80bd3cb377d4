"""The model zoo: open_clip architectures as data, created, saved and loaded without pickles.

Our architectures are open_clip JSON configs in ``configs/`` (``embed_dim``, ``vision_cfg``,
``text_cfg``), registered with ``open_clip.add_model_config`` once, on import of this module.
Any open_clip built-in name works too (``open_clip.list_models()``).

Weights come from one of three places (:class:`ModelSpec.pretrained`):

* ``None``: random initialisation; never touches the network (timm towers included:
  ``timm_model_pretrained`` is forced off).
* a local path: a directory written by :func:`save_model`; a downloaded open_clip model (the
  Hugging Face hub layout: ``open_clip_config.json`` beside ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``), whose config must be the architecture's and whose image
  size, mean/std come with it; or a bare checkpoint file (``.safetensors``, ``.bin``, ``.pt``:
  loaded by ``open_clip.load_checkpoint`` with ``weights_only=True``). Tensors that do not match
  the architecture are an error that names the keys and shapes.
* an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"`` ...) or ``hf-hub:org/name``:
  downloaded by open_clip, so only when the user asks for it (the environment must allow the
  hub; offline, the error says to pass a downloaded directory instead).

A released model is a directory with ``model.safetensors`` and ``model.json`` (architecture
name, the full open_clip config, tokenizer settings, image mean/std, embedding size, and the
sha256 of the weights file): it loads from the config stored beside the weights, so later edits
of ``configs/*.json`` never change a released model.

Both files are canonical: the same tensors and config give the same bytes in any process
(:func:`~lightclip.models.common.canonical_safetensors`, sorted JSON), so DVC and the registry
see an unchanged model as unchanged. Loading hashes the bytes it deserialises and refuses weights
whose sha256 differs from the one recorded (:class:`CorruptWeightsError`): a flipped bit never
reaches an evaluation, an index or the registry. A directory saved before the hash was recorded
still loads, with a warning asking to re-save it: registered MLflow versions hold such
directories as immutable artifacts, and refusing them would stop serving them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import open_clip
import torch
from open_clip.factory import HF_HUB_PREFIX, _find_checkpoint_in_dir
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from pydantic import field_validator
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from torch import nn

from lightclip.config import RESIZE_MODES, ModelConfig
from lightclip.io import atomic_write_bytes, read_format_json
from lightclip.models.common import (
    ModelError,
    canonical_safetensors,
    encode_text,  # part of the zoo's interface: callers encode titles with it
    preprocess_config,
    sha256_hex,
    square_side,
)
from lightclip.models.ensemble import EnsembleCLIP, ensemble_arch_name
from lightclip.models.pooled_text import TEXT_TOWER_KEY, PooledTextCLIP, is_pooled_text

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODEL_FORMAT = "lightclip-model/1"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "model.json"
WEIGHTS_SHA256_KEY = "weights_sha256"  # in model.json: the sha256 of model.safetensors
DEFAULT_ARCH = "lc-vit-t"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # a downloaded open_clip model: {"model_cfg", "preprocess_cfg"}

log = logging.getLogger(__name__)

#: Our architectures (the stems of ``configs/*.json``).
OUR_ARCHS: tuple[str, ...] = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))

_registered = False
_warned_unverified: set[str] = set()


class CorruptWeightsError(ModelError):
    """Weights whose bytes are not the ones ``model.json`` recorded when they were saved."""


def register_configs() -> None:
    """Register ``configs/`` with open_clip (idempotent; done on import)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


register_configs()


def _unknown_arch_message(arch: str) -> str:
    return (
        f"unknown architecture {arch!r}; ours: {', '.join(OUR_ARCHS)}; "
        f"or any open_clip built-in name (see open_clip.list_models(), {len(open_clip.list_models())} names)"
    )


def arch_config(arch: str) -> dict[str, Any]:
    """The open_clip config dict of an architecture (a copy)."""
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ModelError(_unknown_arch_message(arch))
    return config


class ModelSpec(ModelConfig):
    """A :class:`~lightclip.config.ModelConfig` whose architecture is known to open_clip."""

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if open_clip.get_model_config(value) is None:
            raise ValueError(_unknown_arch_message(value))
        return value

    @property
    def config(self) -> dict[str, Any]:
        return arch_config(self.arch)

    @property
    def image_size(self) -> int:
        """Input image side in pixels, from the architecture's ``vision_cfg``."""
        return square_side(self.config["vision_cfg"].get("image_size", 224))

    @property
    def context_length(self) -> int:
        return int(self.config["text_cfg"].get("context_length", 77))

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def _model_class(config: Mapping[str, Any]) -> type[nn.Module]:
    if is_pooled_text(config):
        return PooledTextCLIP
    custom_text = bool(config.get("custom_text", False)) or "hf_model_name" in config.get("text_cfg", {})
    if custom_text:
        return open_clip.CoCa if "multimodal_cfg" in config else open_clip.CustomTextCLIP
    return open_clip.CLIP


def build_from_config(config: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None) -> nn.Module:
    """An open_clip model with random weights from a config dict; never downloads anything."""
    cfg = deepcopy(dict(config))
    cls = _model_class(cfg)
    cfg.pop("custom_text", None)
    cfg.pop(TEXT_TOWER_KEY, None)
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    try:
        model = cls(**cfg)
    except Exception as exc:  # open_clip/timm raise many types for a bad config
        raise ModelError(f"cannot build a model from this config: {type(exc).__name__}: {exc}") from exc
    preprocess = asdict(PreprocessCfg())  # open_clip's defaults (OpenAI mean/std, bicubic, shortest side)
    size = getattr(getattr(model, "visual", None), "image_size", None) or cfg["vision_cfg"].get("image_size", 224)
    preprocess["size"] = square_side(size)
    preprocess.update(preprocess_cfg or {})
    open_clip.set_model_preprocess_cfg(model, preprocess)
    model.lightclip_config = deepcopy(dict(config))  # what save_model records
    return model


def create_model(spec: ModelSpec, *, seed: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``spec``'s model; returns ``(model, preprocess_cfg)``.

    ``seed`` makes random initialisation reproducible without touching the global RNG. The
    spec's ``resize_mode`` becomes the model's (open_clip's name), which :func:`save_model` records.
    """
    config = spec.config
    pretrained = spec.pretrained
    mode = {"resize_mode": RESIZE_MODES[spec.resize_mode]}
    if pretrained is not None and pretrained.startswith(HF_HUB_PREFIX):
        pretrained = str(hub_download(pretrained))
    if pretrained is not None and not Path(pretrained).expanduser().exists():
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        if pretrained not in tags:
            raise ModelError(
                f"pretrained={pretrained!r} is neither an existing local path nor an open_clip tag of "
                f"{spec.arch!r} (tags: {tags or 'none'}), nor an hf-hub:org/name"
            )
        try:
            model = open_clip.create_model(spec.arch, pretrained=pretrained)
        except Exception as exc:
            raise ModelError(
                f"could not fetch open_clip weights {spec.arch}/{pretrained}: {exc}. Downloads need network access "
                "and HF_HUB_OFFLINE unset; offline, pass a local checkpoint path instead"
            ) from exc
        open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model), **mode})
        model.lightclip_arch = spec.arch
        return model, preprocess_config(model)

    path = None if pretrained is None else Path(pretrained).expanduser()
    download = read_download(path, spec.arch) if path is not None and (path / OPEN_CLIP_CONFIG_FILE).is_file() else None
    preprocess = {**(download.preprocess if download else {}), **mode}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = build_from_config(download.config if download else config, preprocess)
    model.lightclip_arch = spec.arch
    if path is not None:
        if download is not None:
            load_checkpoint_file(model, download.weights)
        elif path.is_dir():
            info = read_model_info(path)
            if info["arch"] != spec.arch:
                raise ModelError(f"{path}: holds a {info['arch']!r} model, but the spec asks for {spec.arch!r}")
            load_weights(model, read_verified_weights(path), source=str(path))
        else:
            load_checkpoint_file(model, path)
    return model, preprocess_config(model)


# ----------------------------------------------------------------------------------------------
# Downloaded open_clip models (the Hugging Face hub layout) and checkpoint files
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Download:
    """A downloaded open_clip model: its architecture config, preprocessing and weights file."""

    config: dict[str, Any]
    preprocess: dict[str, Any]
    weights: Path


def hub_download(name: str) -> Path:
    """The local directory of ``hf-hub:org/name`` (config and weights fetched by open_clip into the hub cache).

    Offline (no network, or ``HF_HUB_OFFLINE`` set and nothing cached) it is an error saying how
    to get the directory and pass it instead.
    """
    model_id = name[len(HF_HUB_PREFIX):]
    try:
        config_file = Path(download_pretrained_from_hf(model_id, filename=OPEN_CLIP_CONFIG_FILE))
        weights = Path(download_pretrained_from_hf(model_id))
    except Exception as exc:  # huggingface_hub raises many types (offline, 404, gated repo, no network)
        raise ModelError(
            f"pretrained={name!r}: could not fetch it from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Offline, download it where the network is (huggingface-cli download {model_id} --local-dir DIR, or git clone) "
            "and pass the local directory: pretrained: DIR (it holds open_clip_config.json and the weights)"
        ) from exc
    if weights.parent != config_file.parent:
        raise ModelError(f"pretrained={name!r}: the hub cache holds its config and weights in different folders ({config_file.parent}, {weights.parent})")
    return config_file.parent


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def config_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """``key: ours vs theirs`` for every leaf where two open_clip configs differ (lists compared whole)."""
    a, b = _flatten(ours), _flatten(theirs)
    return [f"{k}: {a.get(k, '(absent)')!r} vs {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_download(directory: Path | str, arch: str) -> Download:
    """A directory in open_clip's download layout, checked against the architecture ``arch``.

    Its ``model_cfg`` must be ``arch``'s config (else the weights belong to another architecture:
    an error naming the differing keys); its ``preprocess_cfg`` (image size, mean/std,
    interpolation) becomes the model's; the weights file is the one open_clip would pick.
    """
    directory = Path(directory)
    path = directory / OPEN_CLIP_CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ModelError(f"{path}: no 'model_cfg' object (an open_clip config holds {{\"model_cfg\": ..., \"preprocess_cfg\": ...}})")
    differences = config_differences(arch_config(arch), data["model_cfg"])
    if differences:
        raise ModelError(
            f"{path}: the checkpoint is not a {arch!r}: {len(differences)} config key(s) differ ({arch} vs checkpoint): {_short(differences, 5)}. "
            "Set model.arch to the checkpoint's architecture"
        )
    weights = _find_checkpoint_in_dir(directory)
    if weights is None:
        raise ModelError(f"{directory}: {OPEN_CLIP_CONFIG_FILE} but no weights file (open_clip_model.safetensors or open_clip_pytorch_model.bin)")
    # what the file sets; the rest is open_clip's defaults, the size the architecture's (build_from_config)
    preprocess = merge_preprocess_dict({}, dict(data.get("preprocess_cfg") or {}))
    if "size" in preprocess:
        preprocess["size"] = square_side(preprocess["size"])
    return Download(config=data["model_cfg"], preprocess=preprocess, weights=Path(weights))


def load_checkpoint_file(model: nn.Module, path: Path | str) -> None:
    """Load a checkpoint file with ``open_clip.load_checkpoint`` (its conversions included, strict).

    When open_clip refuses it, the file is read again to say why: the keys missing, unexpected
    or of another shape (:func:`load_weights`'s message), or that it is no weights file at all.
    A file whose tensors sit under ``model`` (some trainers' layout) is loaded from there.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as exc:
        state = read_checkpoint(path)  # a clear ModelError when the file is unreadable
        load_weights(model, state, source=str(path))  # a clear ModelError naming the keys on a mismatch
        log.info("%s: loaded from its nested state dict (open_clip: %s)", path, exc)


def tokenizer(spec: ModelSpec | str) -> Callable[..., torch.Tensor]:
    """The text tokenizer of an architecture: open_clip's bundled CLIP BPE for ours (offline).

    Calling it on a list of ``n`` strings returns an ``n x context_length`` LongTensor.
    """
    arch = spec.arch if isinstance(spec, ModelSpec) else spec
    context = spec.context_length if isinstance(spec, ModelSpec) else None
    return open_clip.get_tokenizer(arch, context_length=context)


def tokenizer_settings(arch: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """How texts are tokenised for ``config`` (recorded in ``model.json``)."""
    text_cfg = config.get("text_cfg", {})
    settings: dict[str, Any] = {"context_length": int(text_cfg.get("context_length", 77))}
    if text_cfg.get("hf_tokenizer_name"):
        settings.update(type="HFTokenizer", name=text_cfg["hf_tokenizer_name"])
    elif "siglip" in arch.lower():
        settings.update(type="SigLipTokenizer", name=arch)
    else:
        settings.update(type="SimpleTokenizer", name="clip-bpe")
    return settings


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelError(f"{path}: not a readable safetensors file: {exc}") from exc


def _verify(directory: Path, info: Mapping[str, Any], actual: str) -> str:
    """``actual`` (the sha256 of the weights of ``directory``), checked against ``info``'s record."""
    recorded = info.get(WEIGHTS_SHA256_KEY)
    weights, record = directory / WEIGHTS_FILE, directory / INFO_FILE
    if recorded is None:
        if str(weights) not in _warned_unverified:
            _warned_unverified.add(str(weights))
            log.warning("%s: %s records no %s (saved before weights were verified); loaded unverified. "
                        "Re-save the model (load_model + save_model, or re-run its stage) to record it", weights, record, WEIGHTS_SHA256_KEY)
    elif actual != recorded:
        raise CorruptWeightsError(
            f"{weights}: weights sha256 {actual} does not match {recorded} recorded in {record}; the file was damaged "
            "or changed after it was saved. Restore it (dvc checkout, or the registry artifact) or re-run the stage that wrote it"
        )
    return actual


def _weights_path(directory: Path) -> Path:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    return path


def weights_sha256(directory: Path | str) -> str:
    """The sha256 of a saved model's ``model.safetensors``, verified against its ``model.json``.

    What identifies a model's weights (the teacher cache and the index record it); raises
    :class:`CorruptWeightsError` when the file is not the one that was saved.
    """
    directory = Path(directory)
    info = read_model_info(directory)
    with _weights_path(directory).open("rb") as handle:
        return _verify(directory, info, hashlib.file_digest(handle, "sha256").hexdigest())


def pretrained_identity(pretrained: str | None) -> str | None:
    """What identifies the weights a local ``pretrained`` path holds (for checkpoint keys), else None.

    The path alone does not: a download replaced at the same path must not resume a run that
    started from the old weights. A lightclip model directory: its verified weights sha256; a
    download directory: the sha256 of its config and weights file; a checkpoint file: its sha256.
    A tag or ``hf-hub:`` name (None too) is identified by the name the run's params already hold.
    """
    if pretrained is None or pretrained.startswith(HF_HUB_PREFIX):
        return None
    path = Path(pretrained).expanduser()
    if path.is_dir() and (path / INFO_FILE).is_file():
        return weights_sha256(path)
    files = [path / OPEN_CLIP_CONFIG_FILE, Path(_find_checkpoint_in_dir(path) or path / "(no weights)")] if path.is_dir() else [path]
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for file in files:
        if not file.is_file():
            raise ModelError(f"{file}: not found (pretrained={pretrained!r})")
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def read_verified_weights(directory: Path | str, info: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a saved model, from bytes whose sha256 matches ``model.json`` (else an error).

    The file is read once and the bytes hashed are the bytes deserialised, so nothing can change
    between the check and the load. ``info``: the directory's ``model.json`` when the caller
    has read it already.
    """
    directory = Path(directory)
    info = read_model_info(directory) if info is None else info
    path = _weights_path(directory)
    data = path.read_bytes()
    _verify(directory, info, sha256_hex(data))
    try:
        return load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ModelError(f"{path}: not a readable safetensors file: {exc}") from exc


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only=True``, never pickles)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        state: Any = _read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{path}: not a loadable weights-only torch checkpoint: {exc}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a mapping of parameter names to tensors")
    if state and next(iter(state)).startswith("module."):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _short(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names the keys and shapes."""
    expected = model.state_dict()
    state = dict(state)
    if "logit_scale" in state and "logit_scale" in expected and state["logit_scale"].ndim != expected["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_short(shapes)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_short(unexpected)}")
        raise ModelError(f"{source}: weights do not match the architecture; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def save_model(model: nn.Module, spec: ModelSpec | str, directory: Path | str, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``directory`` (no pickle); returns it.

    Both are byte-stable (the same model gives the same bytes in any process); ``model.json``
    records the weights' sha256, which loading verifies.
    """
    arch = spec.arch if isinstance(spec, ModelSpec) else spec
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    preprocess = preprocess_config(model)
    if isinstance(model, EnsembleCLIP):
        members = [{"arch": m.lightclip_arch, "open_clip_config": m.lightclip_config} for m in model.members]
        arch = ensemble_arch_name([m["arch"] for m in members])
        config = members[0]["open_clip_config"]
        structure: dict[str, Any] = {"ensemble": {"members": members}, "embed_dim": sum(int(m["open_clip_config"]["embed_dim"]) for m in members)}
        tokenizer_arch = members[0]["arch"]
    else:
        config = getattr(model, "lightclip_config", None) or arch_config(arch)
        structure = {"open_clip_config": config, "embed_dim": int(config["embed_dim"])}
        tokenizer_arch = arch
    info = {
        "format": MODEL_FORMAT,
        "arch": arch,
        **structure,
        "tokenizer": tokenizer_settings(tokenizer_arch, config),
        "image": {
            "size": preprocess.get("size"),
            "mean": preprocess.get("mean"),
            "std": preprocess.get("std"),
            "interpolation": preprocess.get("interpolation", "bicubic"),
            "resize_mode": preprocess.get("resize_mode", "shortest"),
        },
        "parameters": count_parameters(model),
    }
    if extra:
        info["extra"] = dict(extra)
    weights = canonical_safetensors(state, metadata={"format": MODEL_FORMAT, "arch": arch})
    info[WEIGHTS_SHA256_KEY] = sha256_hex(weights)
    atomic_write_bytes(directory / WEIGHTS_FILE, weights)
    atomic_write_bytes(directory / INFO_FILE, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return directory


def read_model_info(directory: Path | str) -> dict[str, Any]:
    """The ``model.json`` of a saved model."""
    return read_format_json(Path(directory) / INFO_FILE, MODEL_FORMAT, ModelError, missing=f"{directory}: not a saved lightclip model (no {INFO_FILE})")


def load_model(directory: Path | str) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (from its stored config) and load its weights.

    The weights are verified first (:class:`CorruptWeightsError` on a sha256 mismatch).
    """
    directory = Path(directory)
    info = read_model_info(directory)
    image = info.get("image", {})
    preprocess = {k: v for k, v in image.items() if v is not None}
    if "ensemble" in info:
        members = []
        for member in info["ensemble"]["members"]:
            members.append(build_from_config(member["open_clip_config"], preprocess))
            members[-1].lightclip_arch = member["arch"]
        model: nn.Module = EnsembleCLIP(members)
    else:
        model = build_from_config(info["open_clip_config"], preprocess)
        model.lightclip_arch = info["arch"]
    load_weights(model, read_verified_weights(directory, info), source=str(directory / WEIGHTS_FILE))
    model.eval()
    return model


def make_ensemble(member_dirs: Sequence[Path | str]) -> nn.Module:
    """An :class:`~lightclip.models.ensemble.EnsembleCLIP` of saved models (see that module)."""
    members = [load_model(d) for d in member_dirs]
    settings = [read_model_info(d).get("tokenizer") for d in member_dirs]
    for directory, setting in zip(member_dirs[1:], settings[1:]):
        if setting != settings[0]:
            raise ModelError(f"{directory}: tokenizer {setting} differs from {member_dirs[0]}'s {settings[0]}; ensemble members must share it")
    return EnsembleCLIP(members)


def load_tokenizer(directory: Path | str) -> Callable[..., torch.Tensor]:
    """The tokenizer recorded in a saved model's ``model.json``."""
    info = read_model_info(directory)
    settings = info.get("tokenizer", {})
    if settings.get("type", "SimpleTokenizer") != "SimpleTokenizer":
        arch = info["ensemble"]["members"][0]["arch"] if "ensemble" in info else info["arch"]
        return open_clip.get_tokenizer(arch, context_length=settings.get("context_length"))
    return open_clip.SimpleTokenizer(context_length=int(settings.get("context_length", 77)))


# ----------------------------------------------------------------------------------------------
# Introspection
# ----------------------------------------------------------------------------------------------

_POSITIONAL_NAMES = ("positional_embedding", "pos_embed")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``total`` parameters and ``non_embedding`` ones (no token or positional embeddings)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total = 0
    non_embedding = 0
    for name, param in model.named_parameters():
        total += param.numel()
        leaf = name.rsplit(".", 1)[-1]
        if id(param) in embedding_ids or leaf in _POSITIONAL_NAMES:
            continue
        non_embedding += param.numel()
    return {"total": total, "non_embedding": non_embedding}


def logit_scale_max() -> float:
    """open_clip clamps the learned temperature at 100 (``ln 100``)."""
    return math.log(100.0)

"""One typed configuration tree, read one way.

The CLI (`--set optim.lr=1e-4`), a Ray job, a Tune trial and a Train worker all build the same
`Config` through `load_config`; every run saves `cfg.to_dict()` beside its outputs. The tree is made
of frozen dataclasses so a config can be hashed (the preprocessing part keys the cache) and cannot
change under a running job.
"""

from __future__ import annotations

import copy
import hashlib
import json
import types
import typing
import warnings
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

CHANNEL_NAMES = ("raw", "he", "ahe", "clahe", "beasf")
COLOUR_POLICIES = ("reject", "luminance")  # data.colour


@dataclass(frozen=True)
class DataConfig:
    images: str = ""  # folder or s3://bucket/prefix holding the DICOMs (searched recursively)
    labels: str = ""  # train-rle.csv path or URI
    cache: str = ""  # root of the Parquet caches (folder or s3://bucket/prefix)
    rle_scheme: str = "siim"  # "siim" (relative, the competition's) or "standard" (absolute starts)
    num_folds: int = 5
    fold_seed: int = 0
    holdout_fraction: float = 0.0  # patients set aside as a test split (the paper used 0.2)
    unlabeled: str = "skip"  # DICOMs without a label row: "skip" (counted) or "negative"
    colour: str = "reject"  # colour DICOMs (RGB, YBR, palette): "reject" (quarantined, counted) or "luminance"


@dataclass(frozen=True)
class PreprocessConfig:
    channels: tuple[str, ...] = ("raw", "clahe", "beasf")
    image_size_px: int = 512
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    ahe_tile_grid: int = 8  # AHE = CLAHE without clipping
    beasf_gamma: float = 0.5


AUGMENT_WHERE = ("auto", "host", "device")


@dataclass(frozen=True)
class AugmentConfig:
    recipe: str = "paper"  # "paper", "kaggle" or "none"
    # "device": on the training device (batched torch, ptxray.augment.build_device_augment), the data
    # path only reads, shuffles and hands over uint8; "host": albumentations in the data path;
    # "auto": device on CUDA, host on CPU (where OpenCV is faster than grid_sample).
    where: str = "auto"


@dataclass(frozen=True)
class VanillaUNetConfig:
    """model.vanilla: settings of unet_vanilla (the paper's custom U-Net) alone. The defaults give
    widths 16-24-36-54-81-122 and 781,519 trainable parameters at 3 input channels: the paper's
    "about 790,000"."""

    depth: int = 5  # pooling blocks; H and W must be multiples of (2 * stride) ** depth
    base_filters: int = 16
    filter_growth: float = 1.5  # block i has round(base_filters * filter_growth ** i) filters
    kernel_size: int = 3  # odd ("same" padding)
    dilation: int = 1
    stride: int = 1  # of each encoder block's first conv, on top of its 2x2 pooling; 1 = paper
    initializer: str = "glorot_uniform"  # or "he_normal"
    dropout: float = 0.1  # at the bottleneck; block i of depth d gets dropout * (i + 1) / (d + 1)
    batch_norm: bool = True


@dataclass(frozen=True)
class ModelConfig:
    # ptxray.models.available_architectures(): unet_vanilla, fcn, and every smp architecture
    # (unet, unetplusplus, manet, linknet, fpn, pspnet, deeplabv3, deeplabv3plus, pan, upernet, ...)
    arch: str = "unet_vanilla"
    encoder: str = "resnet34"  # smp/timm encoder name (smp architectures and fcn)
    encoder_weights: str = "none"  # "none", a local path, an s3:// URI, or "chexnet:<path or uri>"
    in_channels: int = 0  # 0 = len(preprocess.channels)
    cls_dropout: float = 0.2  # before the classification head's linear layer
    vanilla: VanillaUNetConfig = field(default_factory=VanillaUNetConfig)


# Keys that moved into a nested section (old dotted key -> new one). The old keys still load, from
# YAML, saved config.yaml files of earlier runs and --set, with a FutureWarning naming the new key.
MOVED_KEYS = {f"model.{name}": f"model.vanilla.{name}" for name in (f.name for f in fields(VanillaUNetConfig))}


@dataclass(frozen=True)
class LossConfig:
    name: str = "bce_dice"  # bce, dice, bce_dice, focal, lovasz, focal_dice
    bce_weight: float = 1.0  # BCE term of bce_dice
    dice_weight: float = 1.0  # Dice term of bce_dice and focal_dice
    focal_weight: float = 1.0  # focal term of focal_dice
    focal_gamma: float = 2.0
    dice_per_image: bool = False  # False: one soft Dice over the batch (see ptxray/losses.py)
    cls_weight: float = 0.2  # weight of the image-level classification BCE
    l1_penalty: float = 0.0  # kernel regulariser on conv/linear weights (Keras: sum, not mean)
    l2_penalty: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw, adam, sgd
    lr: float = 3e-4  # the peak lr for onecycle
    weight_decay: float = 1e-4  # on weights of 2+ dims only; biases and norm parameters get none
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    scheduler: str = "cosine"  # cosine (per epoch), onecycle (per step), plateau (per epoch, on train.monitor), none
    min_lr: float = 0.0  # floor of cosine and plateau
    onecycle_pct_start: float = 0.3  # fraction of the steps spent warming up
    plateau_factor: float = 0.5
    plateau_patience: int = 2  # epochs without improvement before plateau cuts the lr
    grad_clip_norm: float = 1.0  # 0 disables


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int | str = 8  # per worker; "auto" = the largest that fits (ptxray.batchsize)
    seed: int = 0
    fold: int = 0
    monitor: str = "val_dice"
    monitor_mode: str = "max"
    early_stop_patience: int = 5  # 0 disables
    early_stop_min_delta: float = 1e-3
    pos_rate_start: float = 0.0  # positive oversampling rate at epoch 0 (0 = natural rate)
    pos_rate_end: float = 0.0  # ... annealed linearly to this at the last epoch
    max_steps_per_epoch: int = 0  # 0 = the whole split


@dataclass(frozen=True)
class ComputeConfig:
    address: str = ""  # Ray address; "" = an embedded local Ray
    num_workers: int = 1  # Ray Train workers per trial; 0 = each Tune trial trains in its own process
    use_gpu: bool = False
    cpus_per_worker: int = 1
    storage_path: str = "runs"  # local folder or s3://bucket/prefix
    max_failures: int = 1
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # NHWC activations, CUDA and CPU (faster on both: the README's channels_last benchmark)
    prepare_batch_size: int = 64  # images per `prepare` task (read, decode, write one Parquet file)
    prefetch_mb: int = 512  # uint8 train batches a Ray Train worker may build ahead of the model (ptxray.ray_train)
    # A Ray Train worker keeps its training shard in memory (uint8) after the first epoch when it
    # fits in this many MB (and in half the node's available memory per worker); 0 = stream every epoch.
    hold_shard_mb: int = 8192


@dataclass(frozen=True)
class SearchConfig:
    name: str = "kfold"
    grid: dict[str, list] = field(default_factory=dict)  # dotted key -> values
    folds: tuple[int, ...] = ()  # () = all folds
    metric: str = "val_dice"
    mode: str = "max"
    early_stop: bool = True
    grace_period: int = 2
    reduction_factor: int = 2
    max_epochs: int = 0  # 0 = train.epochs


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        unknown = [c for c in self.preprocess.channels if c not in CHANNEL_NAMES]
        if unknown or not self.preprocess.channels:
            raise ConfigError(
                f"preprocess.channels: unknown channel(s) {unknown or '(empty)'}; "
                f"choose from {list(CHANNEL_NAMES)}"
            )
        if self.data.colour not in COLOUR_POLICIES:
            raise ConfigError(f"data.colour: expected one of {list(COLOUR_POLICIES)}, got {self.data.colour!r}")
        if self.model.in_channels == 0:
            object.__setattr__(
                self, "model", replace(self.model, in_channels=len(self.preprocess.channels))
            )
        if self.augment.where not in AUGMENT_WHERE:
            raise ConfigError(f"augment.where: {self.augment.where!r} is not one of {list(AUGMENT_WHERE)}")
        if self.compute.hold_shard_mb < 0:
            raise ConfigError(f"compute.hold_shard_mb: must be >= 0 (0 = stream every epoch), got {self.compute.hold_shard_mb}")
        batch_size = _batch_size(self.train.batch_size)
        if repr(batch_size) != repr(self.train.batch_size):  # also 8.0 -> 8
            object.__setattr__(self, "train", replace(self.train, batch_size=batch_size))

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> "Config":
        return apply_overrides(self, overrides)


class ConfigError(ValueError):
    pass


def _batch_size(value: Any) -> int | str:
    """train.batch_size: a positive integer, or "auto" (resolved by ptxray.batchsize before training)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = _coerce(value, int, "train.batch_size")
    except ConfigError:
        number = 0
    if number < 1:
        raise ConfigError(f"train.batch_size: expected a positive integer or 'auto', got {value!r}")
    return number


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn YAML/CLI values into the annotated type, with an error naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:
            return ""
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {unknown}; known keys: {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _moved_warning(where: str, moved: dict[str, str]) -> None:
    listed = ", ".join(f"{old} -> {new}" for old, new in moved.items())
    warnings.warn(
        f"{where}: deprecated config key(s) moved: {listed}; the old names still load for now, write the new ones",
        FutureWarning,
        stacklevel=3,
    )


def upgrade_config_dict(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """`data` with every MOVED_KEYS key at its new place (a FutureWarning names them); `data` itself
    when none is there. A key given both ways with different values is an error."""
    section = data.get("model") if isinstance(data, dict) else None
    old_names = {old.split(".", 1)[1]: new for old, new in MOVED_KEYS.items()}
    present = [k for k in section or {} if k in old_names] if isinstance(section, dict) else []
    if not present:
        return data
    data = copy.deepcopy(data)
    model = data["model"]
    if not isinstance(model.get("vanilla") or {}, dict):
        raise ConfigError(f"{where}: model.vanilla: expected a mapping, got {model['vanilla']!r}")
    nested = dict(model.get("vanilla") or {})
    for name in present:
        value = model.pop(name)
        if name in nested and nested[name] != value:
            raise ConfigError(
                f"{where}: model.{name}={value!r} and model.vanilla.{name}={nested[name]!r} disagree; keep only the second"
            )
        nested[name] = value
    model["vanilla"] = nested
    _moved_warning(where, {f"model.{name}": old_names[name] for name in present})
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    return _from_dict(Config, upgrade_config_dict(data))


def _parse_cli_value(text: str) -> Any:
    # YAML gives ints, floats, bools, lists ("[raw, clahe]") and strings the way users expect.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str] | None) -> Config:
    """Apply dotted-key overrides: {"optim.lr": 1e-4} or ["optim.lr=1e-4", ...]."""
    if not overrides:
        return cfg
    if isinstance(overrides, (list, tuple)):
        parsed: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=1e-4")
            key, text = item.split("=", 1)
            parsed[key.strip()] = _parse_cli_value(text.strip())
        overrides = parsed
    moved = {key: MOVED_KEYS[key] for key in overrides if key in MOVED_KEYS}
    if moved:
        _moved_warning("overrides", moved)
        for old, new in moved.items():
            if new in overrides and overrides[new] != overrides[old]:
                raise ConfigError(f"overrides: {old}={overrides[old]!r} and {new}={overrides[new]!r} disagree; keep only the second")
        overrides = {MOVED_KEYS.get(key, key): value for key, value in overrides.items()}
    data = cfg.to_dict()
    for key, value in overrides.items():
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"{key}: no section {'.'.join(parts[: i + 1])!r}")
            node = node[part]
        if parts[-1] not in node and not (len(parts) > 2 and parts[-2] == "grid"):
            raise ConfigError(f"{key}: unknown key; known keys: {sorted(node)}")
        node[parts[-1]] = value
    if cfg.model.in_channels == len(cfg.preprocess.channels) and "model.in_channels" not in overrides:
        data["model"]["in_channels"] = 0  # re-derive from the (possibly overridden) channels
    return config_from_dict(data)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Defaults ← YAML file (a path, or the name of a recipe shipped in ptxray/configs) ← overrides."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            shipped = Path(__file__).parent / "configs" / f"{path}.yaml"
            if not shipped.exists():
                raise ConfigError(f"{path}: no such config file (nor a shipped recipe of that name)")
            p = shipped
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        data = upgrade_config_dict(data, str(p))  # its errors and warnings name the file already
        try:
            cfg = config_from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    else:
        cfg = Config()
    return apply_overrides(cfg, overrides)


def section_hash(*sections: Any, extra: Any = None) -> str:
    """A stable short hash of config sections (and extra JSON-able data), e.g. to key a cache."""
    payload = json.dumps([_to_plain(s) for s in sections] + [extra], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


__all__ = [
    "AUGMENT_WHERE",
    "AugmentConfig",
    "CHANNEL_NAMES",
    "COLOUR_POLICIES",
    "ComputeConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "MOVED_KEYS",
    "ModelConfig",
    "OptimConfig",
    "PreprocessConfig",
    "SearchConfig",
    "TrainConfig",
    "VanillaUNetConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "section_hash",
    "upgrade_config_dict",
]

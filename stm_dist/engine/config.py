"""The experiment schema: typed dataclasses, YAML loading, `key=value` overrides, validation.

One place decides what a valid experiment is. Every error names the offending key (and, for an
unknown key, the closest known one), so a typo in a 300-epoch recipe fails in the first second.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from stm_dist import package_data

# The source checkout (when imported from one); the shipped configs/ ds_configs/ sweeps/ are
# found through package_data, which also knows the wheel's copies.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ConfigError(ValueError):
    """A config problem; the message names the key (and file) at fault."""


@dataclass
class ModelConfig:
    name: str = "unified_swin_tiny"
    num_classes: int = 1000
    img_size: int = 224
    # None keeps the drop-path rate hard-coded in the model factory (spec §3).
    drop_path_rate: Optional[float] = None
    layer_scale_init_value: float = 1e-6
    # Optional initial weights (our export, a run checkpoint or an original release file).
    pretrained: Optional[str] = None
    # Fine-tuning: take the EMA weights of a file holding both (model_ema / state_dict_ema / an
    # EMA export). A head with another class count is always replaced (and logged).
    pretrained_ema: bool = False
    # A mixer of your own: a .py file (from the working directory, or the checkout) or a module
    # that calls stm_dist.models.register_mixer; every process imports it before model.name is
    # looked up (docs/mixers.md).
    mixer_module: Optional[str] = None
    # "classification", or "detection": Mask R-CNN on the model's detection backbone (the
    # `detection` section; docs/detection.md).
    task: str = "classification"


@dataclass
class DataConfig:
    train_shards: str = ""
    val_shards: str = ""
    # The split names inside those folders (<split>.json): `stm-shards create --split train2017`
    # writes train2017.json.
    train_split: str = "train"
    val_split: str = "val"
    backend: str = "dali"
    num_threads: int = 2
    crop_pct: float = 0.875
    randaug: bool = True
    eval_batch: int = 256
    # Read the tars with plain reads, not mmap (network file systems, where mapping is slow).
    dont_use_mmap: bool = False
    # Each rank appends the sample keys of its micro-batches to <run_dir>/sample_keys_rank<r>.jsonl.
    record_keys: bool = False
    # DALI: processes that read the samples for the pipeline (0 = the training process itself).
    source_workers: int = 0


@dataclass
class DetectionConfig:
    """Mask R-CNN (model.task=detection): the input pipeline's resize/flip/pad and the heads."""
    # Short side of the resized image; several = one drawn per image (multi-scale training).
    # The long side is capped at max_size (mmdet's (1333, 800)); evaluation uses the largest.
    short_sides: list = field(default_factory=lambda: [800.0])
    max_size: int = 1333
    flip_prob: float = 0.5
    size_divisor: int = 32
    # "full": the paper's heads (FPN 256, two FC 1024, 4-conv mask head); "slim": narrow heads
    # for CPU demos and tests.
    head: str = "full"
    # Reproduce mmdet 2.x inference numerics (the paper's released detectors; docs/detection.md).
    mmdet_compat: bool = False


@dataclass
class AugmentConfig:
    mixup: float = 0.8
    cutmix: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1
    reprob: float = 0.25


@dataclass
class OptimConfig:
    lr: float = 1e-3
    warmup_init_lr: float = 1e-6
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    # None = constant weight decay (the original's default).
    weight_decay_end: Optional[float] = None
    eps: float = 1e-8
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 5.0
    # Layer-wise lr decay for fine-tuning (BEiT / timm style, layers from model.group_matcher()):
    # lr x layer_decay ** (num_layers - 1 - layer_id); None = off (the original recipe).
    layer_decay: Optional[float] = None


@dataclass
class ScheduleConfig:
    epochs: int = 300
    warmup_epochs: int = 20
    # > 0 overrides warmup_epochs (as in the original).
    warmup_steps: int = -1
    # Stop after this many optimizer steps (smoke runs, tests); the schedule still spans `epochs`.
    max_steps: Optional[int] = None
    # "cosine" (the classification recipe) or "step": lr x gamma at each epoch in milestones
    # after the linear warm-up (the detection 1x/3x recipes).
    kind: str = "cosine"
    milestones: list = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class TrainConfig:
    # The recipe fixes the global batch; micro_batch is per rank and per forward pass, and
    # gradient accumulation = global_batch / (micro_batch * world_size).
    global_batch: int = 1024
    micro_batch: int = 128
    seed: int = 0
    ema: bool = True
    ema_decay: float = 0.9999
    # Losses stay on the device and are read (and written to metrics.jsonl, one record per
    # step) every log_every steps; stop signals are also agreed on at that cadence.
    log_every: int = 10
    eval_every_epochs: int = 1  # 0: never evaluate (val shards not needed)
    # torch.compile of the model under DeepSpeed; None = on for CUDA, off on the CPU.
    compile: Optional[bool] = None
    # channels_last activations; None = on for CUDA.
    channels_last: Optional[bool] = None


@dataclass
class DeepSpeedConfig:
    # A JSON from ds_configs/ (ZeRO stage x precision); batch, accumulation, clipping and the
    # optimizer are filled from this experiment config so the two never disagree.
    config: str = "ds_configs/zero1_bf16.json"


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    # Also save at the end of every N-th epoch (0 = only every_steps and the end of the run).
    every_epochs: int = 1
    keep_last: int = 3


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    # Also write the live (gathered) weights at the end as live_weights.pt, to check exports.
    dump_live_weights: bool = False
    # Continue a checkpoint whose recipe differs from this config (the differences are logged).
    allow_recipe_change: bool = False
    # Start from this checkpoint (a run dir or one checkpoint's folder) when out_dir has none of
    # its own: branching an experiment (stm-train --resume PATH).
    resume_from: Optional[str] = None
    # Move out_dir's checkpoints aside (never deleted) and start afresh (stm-train --fresh).
    fresh: bool = False


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    ("data", "backend"): ("dali", "pil"),
    ("model", "task"): ("classification", "detection"),
    ("detection", "head"): ("full", "slim"),
    ("schedule", "kind"): ("cosine", "step"),
}
# Keys that name files or folders, checked by `check_paths` (not at parse time: a recipe for
# ImageNet is valid on a laptop without ImageNet; a run is not).
_PATH_KEYS = (
    ("data", "train_shards"),
    ("data", "val_shards"),
    ("deepspeed", "config"),
    ("model", "pretrained"),
    ("run", "resume_from"),
)


def _suggest(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    where = f"{prefix}." if prefix else ""
    return f" (did you mean '{where}{close[0]}'?)" if close else ""


def _coerce(value: Any, tp, where: str):
    """Check `value` against the annotation `tp`; ints are accepted for floats, nothing else."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads '2e-3' (no dot) as a string; a number written that way is still a number.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            return [float(v) for v in value]
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")


def _fill(section, values: dict, prefix: str, source: str):
    hints = typing.get_type_hints(type(section))
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{prefix}' must be a mapping, got {type(values).__name__}")
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{prefix}.{key}'{_suggest(key, hints, prefix)}")
        setattr(section, key, _coerce(value, hints[key], f"{source}: '{prefix}.{key}'"))


def from_dict(raw: dict, source: str = "<dict>") -> ExperimentConfig:
    cfg = ExperimentConfig()
    sections = typing.get_type_hints(ExperimentConfig)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section '{name}'{_suggest(name, sections)}")
        _fill(getattr(cfg, name), values or {}, name, source)
    validate(cfg, source)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """'optim.lr=4e-3' -> ('optim', 'lr', 0.004); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override '{text}': key must be section.key (e.g. optim.lr=4e-3)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return parts[0], parts[1], value


def load(path: str, overrides: list[str] = ()) -> ExperimentConfig:
    path = resolve_config(path)  # a recipe name, or configs/x.yaml from any directory
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raw[section] = {}
        raw[section][key] = value
    cfg = from_dict(raw, source=path)
    # Pinned now (a shipped ds_configs/ file, usually): every later reader (the checks, the recipe
    # hash, the engine) then opens the same file whatever the working directory.
    ds = resolve_path(cfg.deepspeed.config)
    if os.path.isfile(ds):
        cfg.deepspeed.config = ds
    return cfg


def validate(cfg: ExperimentConfig, source: str = "<config>"):
    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"{source}: '{key}' {msg}")

    for (sec, key), choices in _CHOICES.items():
        v = getattr(getattr(cfg, sec), key)
        need(v in choices, f"{sec}.{key}", f"must be one of {list(choices)}, got {v!r}")
    t, o, s, a, d, m = cfg.train, cfg.optim, cfg.schedule, cfg.augment, cfg.data, cfg.model
    need(t.global_batch > 0, "train.global_batch", f"must be > 0, got {t.global_batch}")
    need(t.micro_batch > 0, "train.micro_batch", f"must be > 0, got {t.micro_batch}")
    need(t.global_batch % t.micro_batch == 0, "train.global_batch",
         f"({t.global_batch}) must be a multiple of train.micro_batch ({t.micro_batch})")
    need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    need(t.log_every > 0, "train.log_every", f"must be > 0, got {t.log_every}")
    need(t.eval_every_epochs >= 0, "train.eval_every_epochs", f"must be >= 0 (0: never evaluate), got {t.eval_every_epochs}")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    det = cfg.detection
    need(len(det.short_sides) > 0 and all(v >= 32 for v in det.short_sides), "detection.short_sides",
         f"must list sizes >= 32, got {det.short_sides}")
    need(det.max_size >= max(det.short_sides or [0]), "detection.max_size",
         f"({det.max_size}) must be >= the largest short side ({max(det.short_sides or [0]):g})")
    need(0.0 <= det.flip_prob <= 1.0, "detection.flip_prob", f"must be in [0, 1], got {det.flip_prob}")
    need(det.size_divisor > 0, "detection.size_divisor", f"must be > 0, got {det.size_divisor}")
    need(all(x > 0 for x in s.milestones) and list(s.milestones) == sorted(s.milestones), "schedule.milestones",
         f"must be increasing epochs > 0, got {s.milestones}")
    need(0.0 < s.gamma <= 1.0, "schedule.gamma", f"must be in (0, 1], got {s.gamma}")
    for key in ("warmup_init_lr", "min_lr", "weight_decay"):
        v = getattr(o, key)
        need(v >= 0, f"optim.{key}", f"must be >= 0, got {v}")
    need(o.weight_decay_end is None or o.weight_decay_end >= 0, "optim.weight_decay_end",
         f"must be >= 0, got {o.weight_decay_end}")
    need(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    need(len(o.betas) == 2, "optim.betas", "must have two values")
    need(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", f"must both be in [0, 1), got {o.betas}")
    need(o.clip_grad >= 0, "optim.clip_grad", f"must be >= 0 (0 = off), got {o.clip_grad}")
    need(o.layer_decay is None or 0.0 < o.layer_decay <= 1.0, "optim.layer_decay",
         f"must be in (0, 1] (e.g. 0.75; null = off), got {o.layer_decay}")
    need(s.epochs > 0, "schedule.epochs", f"must be > 0, got {s.epochs}")
    need(s.warmup_epochs >= 0, "schedule.warmup_epochs", f"must be >= 0, got {s.warmup_epochs}")
    need(s.warmup_epochs <= s.epochs, "schedule.warmup_epochs",
         f"({s.warmup_epochs}) must not exceed schedule.epochs ({s.epochs})")
    # The original builds the warm-up ramp only when warmup_epochs > 0; warmup_steps then only
    # changes its length. Alone it would be silently ignored, so it is refused.
    need(s.warmup_steps <= 0 or s.warmup_epochs > 0, "schedule.warmup_steps",
         f"({s.warmup_steps}) only takes effect with schedule.warmup_epochs > 0 (as in the original); "
         f"set warmup_epochs >= 1 or warmup_steps=-1")
    need(s.max_steps is None or s.max_steps > 0, "schedule.max_steps", f"must be > 0, got {s.max_steps}")
    for key in ("switch_prob", "reprob"):
        v = getattr(a, key)
        need(0.0 <= v <= 1.0, f"augment.{key}", f"is a probability: must be in [0, 1], got {v}")
    need(0.0 <= a.smoothing < 1.0, "augment.smoothing", f"must be in [0, 1), got {a.smoothing}")
    for key in ("mixup", "cutmix"):
        v = getattr(a, key)
        need(v >= 0, f"augment.{key}", f"(a Beta alpha; 0 = off) must be >= 0, got {v}")
    need(0.0 < d.crop_pct <= 1.0, "data.crop_pct", f"must be in (0, 1], got {d.crop_pct}")
    need(d.num_threads >= 1, "data.num_threads", f"must be >= 1, got {d.num_threads}")
    need(d.source_workers >= 0, "data.source_workers", f"must be >= 0, got {d.source_workers}")
    need(d.eval_batch >= 1, "data.eval_batch", f"must be >= 1, got {d.eval_batch}")
    need(m.num_classes >= 1, "model.num_classes", f"must be >= 1, got {m.num_classes}")
    need(m.img_size > 0, "model.img_size", f"must be > 0, got {m.img_size}")
    need(not m.pretrained_ema or m.pretrained, "model.pretrained_ema",
         "is true but model.pretrained names no file: set model.pretrained=PATH or drop pretrained_ema")
    need(m.drop_path_rate is None or 0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate",
         f"must be in [0, 1), got {m.drop_path_rate}")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}")
    need(cfg.checkpoint.every_epochs >= 0, "checkpoint.every_epochs", "must be >= 0 (0 = off)")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0 = epoch ends only)")


def check_model_name(cfg: ExperimentConfig):
    """An unknown model.name names the closest registered ones (imports the model registry)."""
    from stm_dist.models.registry import MixerError, load_mixer_module, resolve_name

    spec = cfg.model.mixer_module
    if spec:
        if spec.endswith(".py") or os.sep in spec:
            spec = cfg.model.mixer_module = resolve_path(spec)  # absolute in the saved config
        try:
            load_mixer_module(spec, source="'model.mixer_module'")
        except MixerError as e:
            raise ConfigError(str(e)) from None
    try:
        resolve_name(cfg.model.name)
    except KeyError as e:
        raise ConfigError(f"'model.name': {e.args[0]}") from None


def resolve_path(path: str) -> str:
    """Relative paths are tried from the working directory first, then as the shipped
    configs/ ds_configs/ sweeps/ (the installed package's copies, or the source checkout's),
    then from the source checkout when there is one."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    found = package_data.shipped(path)
    if found:
        return found
    alt = os.path.join(REPO_ROOT, path)
    in_checkout = os.path.isfile(os.path.join(REPO_ROOT, "setup.py"))
    return alt if in_checkout and os.path.exists(alt) else os.path.abspath(path)


def resolve_config(arg: str) -> str:
    """The experiment YAML `arg` names: a file (from the working directory, or a shipped path
    such as configs/unified_swin_tiny.yaml), or a recipe name (`unified_swin_tiny`, a model
    alias such as `unified_halonet_tiny` too; the detection recipes of configs/detection/ by
    their names, `mask_rcnn_unified_swin_tiny_1x`). Else one ConfigError line with close names."""
    path = resolve_path(arg)
    if os.path.isfile(path):
        return path
    named = package_data.find_named(arg, "configs")
    if named is None and not os.path.dirname(arg) and not arg.endswith((".yaml", ".yml")):
        # A model alias names the canonical model's recipe; in a detection recipe's name too, as
        # the paper's release files spell them (mask_rcnn_unified_halonet_tiny_1x).
        det = re.fullmatch(r"mask_rcnn_(.+)_(\d+x)", arg)
        try:
            from stm_dist.models.registry import resolve_name

            name = f"mask_rcnn_{resolve_name(det.group(1))}_{det.group(2)}" if det else resolve_name(arg)
            named = package_data.find_named(name, "configs")
        except KeyError:
            pass
    if named:
        return named
    close = package_data.close_names(arg, "configs")
    where = package_data.folder("configs")
    hint = f"; close recipe names: {', '.join(close)}" if close else ""
    shipped = f"a recipe name (the {len(package_data.names('configs'))} in {where})" if where else "a recipe name"
    if os.path.dirname(arg) or arg.endswith((".yaml", ".yml")):
        raise ConfigError(f"config file not found: {arg} (looked in {os.getcwd()} and the shipped configs/){hint}")
    raise ConfigError(f"no recipe named '{arg}'{hint}; give {shipped} or a path to a YAML file")


def check_paths(cfg: ExperimentConfig, need_train: bool = True, need_val: bool = True):
    """Resolve file/folder keys to absolute paths; a missing one is an error naming the key."""
    for sec, key in _PATH_KEYS:
        section = getattr(cfg, sec)
        value = getattr(section, key)
        if sec == "data" and ((key == "train_shards" and not need_train) or (key == "val_shards" and not need_val)):
            continue
        if value is None or (value == "" and key == "pretrained"):
            continue
        if value == "":
            raise ConfigError(f"'{sec}.{key}' is required but empty")
        path = resolve_path(value)
        if not os.path.exists(path):
            raise ConfigError(f"'{sec}.{key}': no such file or directory: {value}")
        setattr(section, key, path)
    check_num_classes(cfg, need_train=need_train, need_val=need_val)


def check_num_classes(cfg: ExperimentConfig, need_train: bool = True, need_val: bool = True):
    """model.num_classes against the class count of the shards' manifests: labels at or above it
    would stop every process at its first step (`labels outside [0, N)`). A head wider than the
    data set is allowed. A missing or unreadable manifest is left to the loader's own error."""
    from stm_dist.data.manifest import ShardError, read_manifest

    for key, split, needed in (("train_shards", cfg.data.train_split, need_train),
                               ("val_shards", cfg.data.val_split, need_val)):
        shards = getattr(cfg.data, key)
        if not needed or not shards:
            continue
        try:
            n = int(read_manifest(shards, split)["num_classes"])
        except (ShardError, TypeError, ValueError):
            continue
        if cfg.model.num_classes < n:
            raise ConfigError(f"'model.num_classes' is {cfg.model.num_classes} but "
                              f"{os.path.join(shards, split + '.json')} (data.{key}) has {n} classes (labels 0..{n - 1}): "
                              f"set model.num_classes={n}, or shards of {cfg.model.num_classes} classes")


def dump(cfg: ExperimentConfig, path: str):
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def append_history(cfg: ExperimentConfig, path: str, when: str):
    """One YAML document per start, never overwritten: what each (re)start actually ran."""
    with open(path, "a") as f:
        f.write(f"--- # started {when}\n")
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

"""Typed run configuration: YAML layers + ``key=value`` overrides, validated before any model is built.

A run's config is ``config/base.yaml`` + ``config/stage_<N>.yaml`` + any ``--config`` files
+ command-line overrides such as ``train.epochs=1`` (values parsed as YAML). Every key is a
dataclass field below; its comment is its documentation. An unknown key is an error that
names it and lists the keys allowed there. Relative paths are relative to the project
root (the folder holding ``code/``; override with ``TOOLLMM_ROOT``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
CODE_DIR = PACKAGE_DIR.parent
CONFIG_DIR = CODE_DIR / "config"
DSCONFIG_DIR = CODE_DIR / "dsconfig"


def project_root() -> Path:
    if "TOOLLMM_ROOT" in os.environ:
        return Path(os.environ["TOOLLMM_ROOT"]).resolve()
    return CODE_DIR.parent


def resolve_path(value: str | Path) -> Path:
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else project_root() / path


class ConfigError(ValueError):
    """A configuration problem, raised before any model is built."""


@dataclass
class LoraConfig:
    r: int = 32
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    llm_path: str = "pretrained_checkpoint/LLM_ckpt/vicuna_7b"
    """Hugging Face LLaMA-family checkpoint folder (config.json, weights, tokenizer)."""
    imagebind_path: str = "pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth"
    """ImageBind state dict (the official imagebind_huge.pth layout)."""
    imagebind_size: Literal["huge", "tiny"] = "huge"
    """Architecture of the file at imagebind_path: huge (the official model) or the embedded tiny one."""
    tuning: Literal["lora", "full"] = "lora"
    """lora: the published recipe (LoRA on the LLM + input projector). full: the whole LLM
    trains (only for the tiny random-init default, where LoRA on a random base cannot learn)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Precision of the LLM and of the DeepSpeed engine (fills the DeepSpeed config's fp16/bf16 sections)."""
    attn_implementation: str = "sdpa"
    """transformers attention backend (sdpa, eager, flash_attention_2 if installed)."""


@dataclass
class DataFile:
    path: str = ""
    """A JSON list in the ToolMMBench schema."""
    media_root: str = ""
    """Folder the rows' image_path / audio_path / video_path are relative to."""


@dataclass
class SplitConfig:
    test_fraction: float = 0.0
    """0: no split (train on train_files, evaluate on eval_files). >0: pool train_files and
    eval_files, and hold out this fraction of distinct queries as the test split."""
    seed: int = 0


@dataclass
class DataConfig:
    train_files: list[DataFile] = field(default_factory=list)
    eval_files: list[DataFile] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    missing_media: Literal["skip", "text_only", "error"] = "skip"
    """What to do with a row whose media file is missing: skip it (counted and reported),
    use it without the media (text-only prompt, counted and reported), or stop."""
    max_tgt_len: int = 512
    """Cap on the tokens after the media slot (query + answer), as the original's max_tgt_len."""
    feature_cache_dir: str = "data/cache/features"
    """Cached encoder features, keyed by file content and encoder identity."""
    train_eval_queries: int = 200
    """How many training queries the main job also scores (to show the model learned)."""


@dataclass
class TrainConfig:
    stage: int = 3
    output_dir: str = "ckpt/toollmm_vicuna_7b"
    deepspeed_config: str = "dsconfig/stage_3.json"
    """Relative to code/ when not found under the project root."""
    epochs: int = 5
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train all epochs)."""
    max_time_s: float = 0.0
    """Stop after this many seconds of training (0: no limit). The LR schedule still spans
    the planned steps, so a time-limited run ends mid-schedule."""
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    train_batch_size: int | None = 64
    """Must equal micro_batch_size × gradient_accumulation_steps × world size (null: computed)."""
    warmup_rate: float = 0.1
    learning_rate: float | None = None
    """null: take the DeepSpeed config's optimizer lr."""
    seed: int = 0
    save_every_steps: int = 0
    """0: save at the end of each epoch and at the end."""
    keep_last: int = 2
    resume: bool = False
    """Continue from the newest resumable state in output_dir."""
    num_workers: int = 0
    log_every_steps: int = 1
    group_by_length: bool = False
    """Batch examples of similar length together (less padding, same objective); off
    reproduces the original's uniformly random batches."""


@dataclass
class InferenceConfig:
    batch_size: int = 16
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy. The original sampled with temperature 0.4 / top_p 0.7."""
    top_p: float = 1.0
    constrained: bool = False
    """Decode only answers of the tool catalogue (never a malformed or invented tool)."""
    top_k: int = 1
    """K > 1 adds K distinct catalogue tools with their log-probability to each answer."""
    top_k_method: Literal["beam", "exact"] = "beam"
    """beam: beam search over the catalogue trie (2K beams); exact: score every catalogue answer."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(cls, data: Any, where: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {where + '.' if where else ''}{unknown[0]}; allowed here: {', '.join(sorted(names))}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, where)
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(hint))}")
        return value
    args = [a for a in get_args(hint) if a is not type(None)]
    if args and type(None) in get_args(hint):  # Optional[X]
        return None if value is None else _coerce(args[0], value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value (e.g. train.epochs=1)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(stage: int, extra_files: list[str | Path] = (), overrides: list[str] = ()) -> RunConfig:
    """base.yaml + stage_<stage>.yaml + extra files + overrides → validated RunConfig."""
    layers = [CONFIG_DIR / "base.yaml", CONFIG_DIR / f"stage_{stage}.yaml"]
    layers += [Path(p) if Path(p).is_file() else resolve_path(p) for p in extra_files]
    merged: dict = {}
    for layer in layers:
        try:
            merged = _merge(merged, load_yaml(layer))
        except yaml.YAMLError as err:
            raise ConfigError(f"{layer}: not valid YAML: {err}") from err
    for text in overrides:
        merged = _merge(merged, parse_override(text))
    merged.setdefault("train", {})["stage"] = stage
    config = config_from_dict(RunConfig, merged)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    t = config.train
    for name in ("micro_batch_size", "gradient_accumulation_steps", "epochs"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1, got {getattr(t, name)}")
    if not 0.0 <= config.data.split.test_fraction < 1.0:
        raise ConfigError(f"data.split.test_fraction must be in [0, 1), got {config.data.split.test_fraction}")
    if not config.data.train_files:
        raise ConfigError("data.train_files is empty: list at least one {path, media_root}")
    if config.inference.top_k < 1:
        raise ConfigError(f"inference.top_k must be at least 1, got {config.inference.top_k}")
    if config.model.tuning == "lora" and config.model.lora.r < 1:
        raise ConfigError("model.lora.r must be at least 1")


def check_batch_arithmetic(config: RunConfig, world_size: int) -> int:
    t = config.train
    expected = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    if t.train_batch_size is not None and t.train_batch_size != expected:
        raise ConfigError(
            f"train.train_batch_size={t.train_batch_size} but micro_batch_size ({t.micro_batch_size}) × "
            f"gradient_accumulation_steps ({t.gradient_accumulation_steps}) × world size ({world_size}) = {expected}. "
            f"Set train.train_batch_size={expected}, or change train.gradient_accumulation_steps to "
            f"{t.train_batch_size // max(1, t.micro_batch_size * world_size)} (if that divides evenly), "
            "or set train.train_batch_size=null to compute it."
        )
    return expected


def check_paths(config: RunConfig) -> None:
    """Inputs that must exist, named with the key that points at them."""
    problems = []
    llm = resolve_path(config.model.llm_path)
    if not (llm / "config.json").is_file():
        problems.append(f"model.llm_path: {llm} has no config.json (see pretrained_checkpoint/README.md)")
    imagebind = resolve_path(config.model.imagebind_path)
    if not imagebind.is_file():
        problems.append(f"model.imagebind_path: {imagebind} does not exist (see pretrained_checkpoint/README.md)")
    for key in ("train_files", "eval_files"):
        for i, entry in enumerate(getattr(config.data, key)):
            if not resolve_path(entry.path).is_file():
                problems.append(f"data.{key}[{i}].path: {resolve_path(entry.path)} does not exist")
    if not deepspeed_config_path(config).is_file():
        problems.append(f"train.deepspeed_config: {config.train.deepspeed_config} not found under the project root or code/")
    if problems:
        raise ConfigError("missing inputs:\n  " + "\n  ".join(problems))


def deepspeed_config_path(config: RunConfig) -> Path:
    candidate = resolve_path(config.train.deepspeed_config)
    return candidate if candidate.is_file() else CODE_DIR / config.train.deepspeed_config


def load_deepspeed_config(config: RunConfig) -> dict:
    with open(deepspeed_config_path(config)) as f:
        return json.load(f)

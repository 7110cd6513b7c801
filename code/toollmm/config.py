"""Typed run configuration: YAML layers + ``key=value`` overrides, validated before any model is built.

A run's config is ``base.yaml`` + ``stage_<N>.yaml`` + any ``--config`` files + command-line
overrides such as ``train.epochs=1`` (values parsed as YAML). The shipped YAML files are package
data (``toollmm/configs/``): ``--config tiny`` names one of them, a path names a file of yours.
Every key is a dataclass field below, documented by the one-line string after it (what ``--help``
lists, through ``toollmm.config_help``; docs/configuration.md says more where a line is not
enough). An unknown key is an error that names it and lists the keys allowed there.

Relative paths (checkpoints, data, output folders) are relative to the project root:
``TOOLLMM_ROOT`` if set, else the source checkout this package runs from (a clone with an
editable install), else the current directory (a plain ``pip install``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from toollmm.output_modalities import OUTPUT_MODALITIES

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"


def _source_checkout() -> Path | None:
    """The clone holding this package (code/toollmm/ under a folder with pyproject.toml), if any."""
    candidate = PACKAGE_DIR.parent.parent
    if PACKAGE_DIR.parent.name == "code" and (candidate / "pyproject.toml").is_file():
        return candidate
    return None


def project_root() -> Path:
    if "TOOLLMM_ROOT" in os.environ:
        return Path(os.environ["TOOLLMM_ROOT"]).resolve()
    return _source_checkout() or Path.cwd()


def resolve_path(value: str | Path) -> Path:
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else project_root() / path


def packaged_configs() -> list[str]:
    """Names accepted by ``--config`` besides file paths."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base" and not p.stem.startswith("stage_"))


def find_config_file(name: str | Path) -> Path:
    """``--config`` value → file: an existing path (absolute, from the current directory or the
    project root), else a packaged config by name (``tiny`` or ``tiny.yaml``)."""
    given = Path(os.path.expanduser(str(name)))
    for candidate in (given, resolve_path(given)):
        if candidate.is_file():
            return candidate
    packaged = CONFIG_DIR / (given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml")
    if given.parent == Path(".") and packaged.is_file():
        return packaged
    raise ConfigError(
        f"config file {name} does not exist (looked in {Path.cwd()} and {project_root()}); "
        f"packaged configs: {', '.join(packaged_configs())}"
    )


class ConfigError(ValueError):
    """A configuration problem, raised before any model is built."""


@dataclass
class LoraConfig:
    r: int = 32
    """LoRA rank (published: 32)."""
    alpha: int = 32
    """LoRA scaling: updates are scaled by alpha / r (published: 32)."""
    dropout: float = 0.1
    """Dropout on LoRA's input, 0-1 (published: 0.1)."""
    target_modules: list[str] | None = None
    """Module name suffixes LoRA adapts; null: the family's attention projections; [all-linear]: every linear."""


@dataclass
class OutputModalityConfig:
    """One output modality (NExT-GPT): its signal-token run and its decoder's conditioning shape.
    Each ``model.outputs.<modality>`` section defaults to its published values
    (``toollmm.output_modalities``); the class defaults are the image's."""

    signal_tokens: int = OUTPUT_MODALITIES["image"].signal_tokens
    """Length of the signal-token run, e.g. [IMG0]..[IMG3] (published: image 4, video 24, audio 8)."""
    target_tokens: int = OUTPUT_MODALITIES["image"].target_tokens
    """Tokens of the decoder's text conditioning (published: 77 for SD-1.5 and Zeroscope, 1 for AudioLDM)."""
    target_dim: int = OUTPUT_MODALITIES["image"].target_dim
    """Width of the decoder's text conditioning (published: SD-1.5 768, Zeroscope 1024, AudioLDM 512)."""
    loss_scale: float = 1.0
    """Weight of this modality's alignment loss (published: 1; video 2 in stage 3)."""
    decoder_path: str = OUTPUT_MODALITIES["image"].decoder_path
    """The decoder's diffusers folder; its text_encoder/ and tokenizer/ make the caption embeddings."""


def published_output(name: str) -> OutputModalityConfig:
    """The defaults of ``model.outputs.<name>``: its registry entry's published values."""
    entry = OUTPUT_MODALITIES[name]
    return OutputModalityConfig(signal_tokens=entry.signal_tokens, target_tokens=entry.target_tokens,
                                target_dim=entry.target_dim, decoder_path=entry.decoder_path)


@dataclass
class OutputProjectorConfig:
    """Signal-token hidden states → decoder conditioning. Defaults are the published transformer."""

    mode: Literal["transformer", "linear"] = "transformer"
    """transformer: the published encoder-decoder projector; linear: a per-token linear map and a token mix."""
    hidden_size: int = 512
    """Width of the transformer projector (published: 512)."""
    encoder_layers: int = 4
    """Encoder layers of the transformer projector (published: 4)."""
    decoder_layers: int = 4
    """Decoder layers of the transformer projector, reading target_tokens learned queries (published: 4)."""
    heads: int = 4
    """Attention heads of the transformer projector (published: 4)."""
    ffn_size: int = 2048
    """Feed-forward width of the transformer projector's layers (published: 2048)."""


@dataclass
class OutputsConfig:
    """Any-to-any outputs (NExT-GPT): signal tokens added to the vocabulary, output projectors,
    caption-embedding targets. Off: the tool-only recipe (MLLM-Tool), vocabulary unchanged."""

    enabled: bool = False
    """Add the signal tokens, output projectors and caption-embedding targets (stages 1-2 need it)."""
    projector: OutputProjectorConfig = field(default_factory=OutputProjectorConfig)
    train_rows: Literal["signal", "all"] = "signal"
    """Embedding and LM-head rows that train: signal (the added signal-token rows only) or all (whole)."""
    alignment_loss: Literal["l2", "mse"] = "l2"
    """l2: mean Euclidean distance to the caption embedding (as the published code); mse: mean squared error."""
    # One section per entry of OUTPUT_MODALITIES, in its order (tests/test_config.py checks it).
    image: OutputModalityConfig = field(default_factory=lambda: published_output("image"))
    video: OutputModalityConfig = field(default_factory=lambda: published_output("video"))
    audio: OutputModalityConfig = field(default_factory=lambda: published_output("audio"))

    def modality(self, name: str) -> OutputModalityConfig:
        return getattr(self, name)

    def target_shape(self, name: str) -> tuple[int, ...]:
        """One caption embedding (and projector output) of modality ``name``: (tokens, dim), or
        (dim,) where its decoder takes one pooled vector (AudioLDM)."""
        output = self.modality(name)
        return OUTPUT_MODALITIES[name].text_encoding.shape(output.target_tokens, output.target_dim)


@dataclass
class ModelConfig:
    llm_path: str = "pretrained_checkpoint/LLM_ckpt/vicuna_7b"
    """Hugging Face causal-LM folder (config.json, weights, tokenizer) of a family in toollmm.model.families."""
    imagebind_path: str = "pretrained_checkpoint/imagebind_ckpt/huge/imagebind_huge.pth"
    """ImageBind state dict file (the official imagebind_huge.pth layout)."""
    imagebind_size: Literal["huge", "tiny"] = "huge"
    """Architecture of the imagebind_path file: huge (the official model) or tiny (the embedded tiny one)."""
    tuning: Literal["lora", "full"] = "lora"
    """lora: LoRA on the LLM plus the input projector (published); full: the whole LLM trains."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Precision of the LLM and of the DeepSpeed engine: bf16, fp16 (trains on CUDA only) or fp32."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: sdpa, eager, flex_attention, flash_attention_2/_3 if installed."""
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    base_check: Literal["refuse", "warn"] = "refuse"
    """A checkpoint put on a base whose weights differ from its recorded fingerprint: refuse or warn."""


@dataclass
class DataFile:
    path: str = ""
    """A JSON list of rows in the ToolMMBench schema."""
    media_root: str = ""
    """Folder the rows' image_path / audio_path / video_path are relative to."""
    media_layout: Literal["flat", "published"] = "flat"
    """flat: media at media_root/<path>; published: the authors' mm_dataset/ layout (image/, audio/ subfolders)."""


@dataclass
class CaptionFile:
    """A caption file in the published NExT-GPT layout (t2x_pairs): a pair index (cc3m.json,
    webvid.json, audiocap.json), a *_comprehension.json or a *_generation.json file."""

    modality: Literal["image", "video", "audio"] = "image"
    """The medium of the file's rows: image, video or audio."""
    path: str = ""
    """A pair index (cc3m.json, webvid.json, audiocap.json), a *_comprehension.json or a *_generation.json file."""
    media_root: str = ""
    """Folder of the media files the rows name."""
    embeddings_dir: str = ""
    """Caption embeddings written by process_embeddings.py (stage 2, and stage 3's generation rows)."""


@dataclass
class SplitConfig:
    test_fraction: float = 0.0
    """0: train on train_files, evaluate on eval_files; >0: pool both and hold out this fraction of queries."""
    seed: int = 0
    """Seed of the held-out split's draw (with test_fraction > 0) and of the unseen tools' draw."""
    unseen_tools: float = 0.0
    """Fraction of tools (per input modality) never trained on, tested as unseen; 0: all tools train."""


@dataclass
class MediaLimits:
    """Bounds read from a media file's header before it is decoded: a file past one is a counted
    skip, not an allocation of gigabytes (a 444-byte WAV can claim 2**31 - 1 samples a second)."""

    min_audio_sample_rate: int = 4000
    """Lowest audio sample rate decoded, in Hz (resampling up to 16 kHz multiplies the samples)."""
    max_audio_sample_rate: int = 192000
    """Highest audio sample rate decoded, in Hz."""
    max_audio_channels: int = 8
    """Most audio channels decoded."""
    max_audio_seconds: float = 3600.0
    """Longest audio decoded, in seconds."""
    max_image_pixels: int = 50_000_000
    """Largest image decoded, in pixels (width × height), a bound below PIL's own."""
    max_video_frames: int = 1_000_000
    """Most video frames decoded."""
    max_video_seconds: float = 14400.0
    """Longest video decoded, in seconds."""
    max_video_pixels: int = 50_000_000
    """Largest video frame decoded, in pixels (width × height), checked on the first frame decoded."""


@dataclass
class DataConfig:
    train_files: list[DataFile] = field(default_factory=list)
    """Tool-selection training files, each {path, media_root, media_layout} (stage 3)."""
    eval_files: list[DataFile] = field(default_factory=list)
    """Tool-selection evaluation files, each {path, media_root, media_layout}."""
    caption_files: list[CaptionFile] = field(default_factory=list)
    """Stages 1-2: caption pairs (stage 1: X → caption; stage 2: caption → signal tokens)."""
    instruction_files: list[CaptionFile] = field(default_factory=list)
    """Stage 3 besides train_files: *_comprehension.json (X → text) and *_generation.json (text → X)."""
    caption_prompt: str = "generate a caption"
    """Stage 1's instruction after the medium (published: generate a caption)."""
    split: SplitConfig = field(default_factory=SplitConfig)
    missing_media: Literal["skip", "text_only", "error"] = "skip"
    """A row whose media file is missing: skip it, text_only (use it without the media), or error (stop)."""
    duplicate_rows: Literal["keep", "drop"] = "keep"
    """keep: every training row is an example (as published); drop: each (query, media, tool) once."""
    tool_names: Literal["verbatim", "stripped"] = "verbatim"
    """Tool names in the training targets: verbatim as the rows write them (as published), or stripped."""
    sampling: Literal["shuffled_union", "published"] = "shuffled_union"
    """shuffled_union: every example once from one shuffled pool; published: each micro-batch from one file."""
    max_tgt_len: int = 512
    """Cap on the tokens after the media slot, query + answer (published: 512)."""
    feature_cache_dir: str = "data/cache/features"
    """Folder of cached encoder features, keyed by file content and encoder identity."""
    train_eval_queries: int = 200
    """How many training queries the main job also scores (to show the model learned)."""
    media_limits: MediaLimits = field(default_factory=MediaLimits)


@dataclass
class TrainConfig:
    """How a stage trains. The optimizer, schedule, batch sizes, ZeRO stage and precision
    (``model.dtype``) make the DeepSpeed config (``toollmm.engine.deepspeed_config``)."""

    stage: int = 3
    """1: encoder alignment, 2: decoder alignment, 3: instruction tuning (set by --stage)."""
    output_dir: str = "ckpt/toollmm_vicuna_7b"
    """Folder of the run's config, metrics, checkpoints and resume states."""
    epochs: int = 5
    """Passes over the training data (published: 5 in stage 3, 1 in stages 1-2)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train all epochs)."""
    max_time_s: float = 0.0
    """Stop after this many seconds of training (0: no limit); the LR schedule still spans the planned steps."""
    micro_batch_size: int = 4
    """Examples per GPU in one forward and backward pass (published: 4 in stage 3)."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer step (published: 4 in stage 3)."""
    train_batch_size: int | None = 64
    """Examples per optimizer step: micro_batch_size × gradient_accumulation_steps × world size (null: computed)."""
    learning_rate: float = 5e-4
    """Peak AdamW learning rate, reached after warm-up, then decayed linearly to 0 (published: 5e-4)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (beta1, beta2) (published: [0.9, 0.95])."""
    weight_decay: float = 0.001
    """AdamW's decoupled weight decay, not on vocabulary matrices that train in signal rows only (published: 0.001)."""
    adam_eps: float = 1e-8
    """AdamW's epsilon (published: 1e-8)."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this (0: no clipping; published: 1.0)."""
    warmup_rate: float = 0.1
    """Warm-up length as a fraction of the planned optimizer steps, 0-1 (published: 0.1)."""
    warmup_rule: Literal["ceil", "published"] = "ceil"
    """Warm-up steps of T planned: ceil is max(1, ceil(rate·T)); published is max(10, int(rate·T))."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 1, 2 or 3; 3 also shards the weights, the frozen base included (published: 2)."""
    offload_optimizer: bool = False
    """ZeRO-Offload the optimizer to the CPU: slower, for small GPUs (the original's DeepSpeed setting)."""
    grad_overflow_check: bool = True
    """bf16: scan every gradient for inf/NaN before each step and skip a step that has one."""
    deepspeed_config: str | None = None
    """JSON file of further DeepSpeed settings, none that the keys here set (null: none)."""
    seed: int = 0
    """Seed of the initialisation, dropout and data order (each rank adds its rank)."""
    init_from: str | None = None
    """A previous stage's checkpoint to start from (checked: same base, signal tokens and projectors)."""
    save_every_steps: int = 0
    """Save a checkpoint every this many optimizer steps (0: at the end of each epoch) and at the end."""
    keep_last: int = 2
    """How many checkpoints and resume states to keep, the newest (0: keep all)."""
    held_out_tools: bool = False
    """Stage 3: loss and token accuracy on the test split's tool rows, before and after training."""
    resume: bool = False
    """Continue from the newest resumable state in output_dir (also --resume)."""
    overwrite: bool = False
    """Delete another run's files in output_dir before a new run (without it, such a folder is refused)."""
    num_workers: int = 0
    """DataLoader worker processes (0: batches are built in the training process)."""
    log_every_steps: int = 1
    """Write a metrics record every this many optimizer steps."""
    answer_logits_only: bool = True
    """Run the LM head on the answer positions only (same loss, less memory and compute)."""
    max_nonfinite_in_a_row: int = 10
    """Micro-batches with a non-finite loss are skipped; this many in a row stop the run."""
    gradient_checkpointing: bool = False
    """Recompute the LLM's activations in the backward pass: less memory, about a third more compute."""
    checkpoint_above_tokens: int = 0
    """Recompute only micro-batches of more than this many padded tokens (0: never)."""
    packing: bool = False
    """Pack each micro-batch's examples into rows of at most pack_length tokens instead of padding them."""
    pack_length: int = 1024
    """Longest packed row, in tokens (with packing; at least the longest example)."""
    pack_width_multiple: int = 0
    """With packing: round row widths up to a multiple of this, at most pack_length (few shapes; 0: off)."""
    group_by_length: bool = False
    """Batch examples of similar length together: less padding, but not the same optimization."""
    length_group_batches: int = 32
    """With group_by_length: how many global batches are sorted by length together."""
    compile: bool = False
    """torch.compile each LLM decoder layer; the first step pays the compile."""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode for the layers (not the CUDA-graph modes: their GPU test failed with flex attention)."""
    fp8: bool = False
    """FP8 matmuls for the LLM's frozen base linear layers, their weights cast once; needs compute capability 8.9+."""
    profile_steps: int = 0
    """Profile this many optimizer steps after 3 warm-up steps into output_dir (0: no profile)."""


@dataclass
class InferenceConfig:
    batch_size: int = 16
    """Queries or prompts per generation batch (top_k_method beam: rows, prompts × beams)."""
    max_new_tokens: int = 64
    """Token limit of a tool answer."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling's probability mass, with temperature > 0 (1: all tokens)."""
    constrained: bool = False
    """Decode only answers of the tool catalogue (never a malformed or invented tool)."""
    top_k: int = 1
    """K > 1 adds K distinct catalogue tools with their log-probability to each answer."""
    catalogue_tools: Literal["all", "trained"] = "all"
    """Catalogue from the data files: all their tools, or only those with a training row (the closed set)."""
    top_k_method: Literal["beam", "exact"] = "beam"
    """beam: beam search over the catalogue trie (fast, may miss a better tool); exact: score every answer."""
    num_beams: int | None = None
    """Beams of top_k_method beam (null: 2K; more beams find the exact top K more often)."""
    chat_max_new_tokens: int = 128
    """Token limit of a chat reply (--mode chat, the demo's chat)."""
    merge_lora: bool = True
    """Fold LoRA into the base weights before answering (faster decoding; false keeps the adapters apart)."""
    max_batch_tokens: int | None = None
    """KV-cache cap of a generation batch, padded tokens: rows × (longest prompt + max_new_tokens); null: none."""
    cache: Literal["dynamic", "static"] = "static"
    """KV cache of generation: static (preallocated, written in place) or dynamic (grows, copied every step)."""
    compile: bool = False
    """With cache static on CUDA, compile the decoding step (CUDA graphs): faster steps after a compile."""
    attn_implementation: str | None = None
    """Attention backend while answering: sdpa, eager, flash_attention_2/_3 (if installed); null: the model's."""
    open_set_slots: int = 0
    """The last N of the top_k tools go to catalogue tools the model never trained on, by the tool retriever."""
    tool_retriever: str = ""
    """Folder of the tool retriever (train_retriever.py) for open_set_slots; empty: <checkpoint>/tool_retriever."""


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
    defaults = cls()
    kwargs = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A partial section keeps the field's own defaults (model.outputs.video is 24 tokens
            # of 77×1024 although OutputModalityConfig's class defaults are the image's).
            value = _merge(dataclasses.asdict(default), value)
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
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
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot, no sign in the exponent) as a string.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
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
    layers += [find_config_file(p) for p in extra_files]
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


SEED_MAX = 2**32 - 1
"""numpy's seeds are 0 .. 2**32 - 1."""

RANGES = {
    # key: (lowest, highest, whether the lowest itself is allowed); every value must be finite
    "train.micro_batch_size": (1, None, True), "train.gradient_accumulation_steps": (1, None, True),
    "train.epochs": (1, None, True), "train.length_group_batches": (1, None, True),
    "train.log_every_steps": (1, None, True), "train.max_nonfinite_in_a_row": (1, None, True),
    "train.pack_length": (1, None, True), "train.pack_width_multiple": (0, None, True),
    "train.max_steps": (0, None, True), "train.max_time_s": (0, None, True),
    "train.save_every_steps": (0, None, True), "train.keep_last": (0, None, True), "train.num_workers": (0, None, True),
    "train.checkpoint_above_tokens": (0, None, True), "train.profile_steps": (0, None, True),
    "train.warmup_rate": (0, 1, True), "train.learning_rate": (0, None, False), "train.seed": (0, SEED_MAX, True),
    "train.weight_decay": (0, None, True), "train.adam_eps": (0, None, False), "train.gradient_clipping": (0, None, True),
    "train.train_batch_size": (1, None, True),
    "data.max_tgt_len": (1, None, True), "data.train_eval_queries": (0, None, True), "data.split.seed": (0, SEED_MAX, True),
    "data.media_limits.min_audio_sample_rate": (1, None, True), "data.media_limits.max_audio_sample_rate": (1, None, True),
    "data.media_limits.max_audio_channels": (1, None, True), "data.media_limits.max_audio_seconds": (0, None, False),
    "data.media_limits.max_image_pixels": (1, None, True), "data.media_limits.max_video_frames": (1, None, True),
    "data.media_limits.max_video_seconds": (0, None, False),
    "data.media_limits.max_video_pixels": (1, None, True),
    "model.lora.r": (1, None, True), "model.lora.alpha": (0, None, False), "model.lora.dropout": (0, 1, True),
    "inference.batch_size": (1, None, True), "inference.max_new_tokens": (1, None, True),
    "inference.temperature": (0, None, True), "inference.top_p": (0, 1, False),
    **{f"model.outputs.{m}.{key}": (low, None, True) for m in OUTPUT_MODALITIES
       for key, low in (("signal_tokens", 1), ("target_tokens", 1), ("target_dim", 1), ("loss_scale", 0))},
    "inference.chat_max_new_tokens": (1, None, True),
}
ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_ranges(config: RunConfig) -> None:
    """Every numeric key of ``RANGES`` finite and in its range (null stays allowed where the type says so)."""
    for key, (low, high, low_ok) in RANGES.items():
        section, *path = key.split(".")
        value = getattr(config, section)
        for name in path:
            value = getattr(value, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (value == low and not low_ok) or (high is not None and value > high):
            bound = f"{'at least' if low_ok else 'above'} {low}" + (f" and at most {high}" if high is not None else "")
            raise ConfigError(f"{key} must be {bound}, got {value}" + ("" if math.isfinite(value) else " (not finite)"))


def check_pooled_outputs(outputs: OutputsConfig) -> None:
    """A decoder conditioned on one pooled vector (AudioLDM) takes one target token."""
    for name, entry in OUTPUT_MODALITIES.items():
        if entry.text_encoding.pooled and outputs.modality(name).target_tokens != 1:
            raise ConfigError(
                f"model.outputs.{name}.target_tokens must be 1: the {name} decoder ({entry.pipeline}) is conditioned on "
                f"one {outputs.modality(name).target_dim}-d vector, got {outputs.modality(name).target_tokens}"
            )


def validate(config: RunConfig) -> None:
    t = config.train
    check_ranges(config)
    check_pooled_outputs(config.model.outputs)
    if config.model.attn_implementation not in ATTENTION:
        raise ConfigError(f"model.attn_implementation: {config.model.attn_implementation!r} is not one of {list(ATTENTION)}")
    if config.model.tuning == "lora" and config.model.lora.target_modules == []:
        raise ConfigError("model.lora.target_modules is empty: name the LLM's linear layers LoRA adapts (e.g. [q_proj, v_proj]), "
                          "or set it to null for the LLM family's row")
    if not 0.0 <= config.data.split.test_fraction < 1.0:
        raise ConfigError(f"data.split.test_fraction must be in [0, 1), got {config.data.split.test_fraction}")
    if not 0.0 <= config.data.split.unseen_tools < 1.0:
        raise ConfigError(f"data.split.unseen_tools must be in [0, 1), got {config.data.split.unseen_tools}")
    if t.stage == 3 and not (config.data.train_files or config.data.instruction_files):
        raise ConfigError("stage 3 has no data: list data.train_files (tool rows) and/or data.instruction_files")
    if t.stage in (1, 2) and not config.data.caption_files:
        raise ConfigError(f"stage {t.stage} trains on caption pairs: list them in data.caption_files")
    if t.stage in (1, 2) and not config.model.outputs.enabled:
        raise ConfigError(f"stage {t.stage} needs the signal tokens: set model.outputs.enabled=true")
    validate_inference(config.inference)
    if t.held_out_tools and not (t.stage == 3 and config.data.train_files
                                 and (config.data.eval_files or config.data.split.test_fraction > 0)):
        raise ConfigError("train.held_out_tools measures the test split's tool rows in stage 3: it needs stage 3, "
                          "data.train_files, and data.eval_files or data.split.test_fraction > 0")
    if config.data.sampling == "published" and t.group_by_length:
        raise ConfigError("data.sampling=published draws each micro-batch from one file at random; it cannot also group "
                          "by length: set train.group_by_length=false or data.sampling=shuffled_union")
    if t.zero_stage not in (1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 1, 2 or 3, got {t.zero_stage}")
    if t.fp8 and t.stage == 3 and config.model.tuning == "full":
        raise ConfigError("train.fp8 runs the frozen base weights in FP8, and model.tuning=full trains them all: "
                          "set model.tuning=lora or train.fp8=false")
    if t.fp8 and t.zero_stage == 3:
        raise ConfigError("train.fp8 needs whole weights on each GPU to cast them to FP8, and ZeRO-3 shards them: "
                          "set train.zero_stage=2 or train.fp8=false")
    if t.compile_mode != "default" and not t.compile:
        raise ConfigError(f"train.compile_mode={t.compile_mode} is the mode of train.compile, which is off: "
                          "set train.compile=true or leave train.compile_mode at default")
    if t.pack_width_multiple and not t.packing:
        raise ConfigError("train.pack_width_multiple rounds the width of packed rows, and train.packing is off: "
                          "set train.packing=true or train.pack_width_multiple=0")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {t.betas}")


def validate_inference(settings: InferenceConfig) -> None:
    """The ``inference`` section's checks across fields (ranges are in ``RANGES``)."""
    answering = [name for name in ATTENTION if name != "flex_attention"]
    if settings.attn_implementation is not None and settings.attn_implementation not in answering:
        raise ConfigError(f"inference.attn_implementation: {settings.attn_implementation!r} is not one of {answering} "
                          "(or null: the model's)")
    if settings.top_k < 1:
        raise ConfigError(f"inference.top_k must be at least 1, got {settings.top_k}")
    if settings.max_batch_tokens is not None and settings.max_batch_tokens < 1:
        raise ConfigError(f"inference.max_batch_tokens must be at least 1 (or null: no cap), got {settings.max_batch_tokens}")
    if settings.num_beams is not None and (settings.top_k == 1 or settings.top_k_method != "beam"):
        raise ConfigError("inference.num_beams applies to inference.top_k > 1 with inference.top_k_method=beam only: "
                          "set those, or inference.num_beams=null")
    if settings.num_beams is not None and settings.num_beams < settings.top_k:
        raise ConfigError(f"inference.num_beams={settings.num_beams} cannot return {settings.top_k} tools: "
                          f"set inference.num_beams={settings.top_k} or more")
    if settings.open_set_slots and not 0 < settings.open_set_slots < settings.top_k:
        raise ConfigError(f"inference.open_set_slots={settings.open_set_slots} must be between 1 and inference.top_k - 1 "
                          f"(top_k is {settings.top_k}; the first tool is always the model's): raise inference.top_k or "
                          "lower the slots")


INFERENCE_OVERRIDES = ("inference.", "model.llm_path")
"""What a checkpoint's config takes at inference: the rest describes the trained model."""


def apply_inference_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """A checkpoint's config with inference-time ``key=value`` overrides (``inference.top_k=5``,
    ``model.llm_path=DIR`` if the base moved), checked as training checks its own."""
    merged = config.to_dict()
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if "=" in text and not key.startswith(INFERENCE_OVERRIDES):
            raise ConfigError(f"override {key}: inference takes inference.<key>=VALUE and model.llm_path=DIR; "
                              "the other sections describe the trained checkpoint")
        merged = _merge(merged, parse_override(text))
    updated = config_from_dict(RunConfig, merged)
    check_ranges(updated)
    validate_inference(updated.inference)
    return updated


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


def check_training_device(config: RunConfig, device_type: str) -> None:
    """Settings that train on CUDA only, refused before any model loads."""
    if config.model.dtype == "fp16" and device_type != "cuda":
        raise ConfigError(f"model.dtype=fp16 trains on CUDA only (DeepSpeed has no fp16 on {device_type}): "
                          "set model.dtype=fp32 (or bf16)")
    if config.model.attn_implementation == "flex_attention" and device_type != "cuda":
        raise ConfigError(
            f"model.attn_implementation=flex_attention trains on CUDA only (torch's FlexAttention has no "
            f"backward on {device_type}): set model.attn_implementation=sdpa here; packed rows give the same "
            "losses under it, on a slower masked kernel"
        )


def check_paths(config: RunConfig) -> None:
    """Inputs that must exist, named with the key that points at them."""
    problems = []
    llm = resolve_path(config.model.llm_path)
    if not (llm / "config.json").is_file():
        problems.append(f"model.llm_path: {llm} has no config.json (see pretrained_checkpoint/README.md)")
    imagebind = resolve_path(config.model.imagebind_path)
    if not imagebind.is_file():
        problems.append(f"model.imagebind_path: {imagebind} does not exist (see pretrained_checkpoint/README.md)")
    keys = ("caption_files",) if config.train.stage in (1, 2) else ("train_files", "eval_files", "instruction_files")
    for key in keys:
        for i, entry in enumerate(getattr(config.data, key)):
            if not resolve_path(entry.path).is_file():
                problems.append(f"data.{key}[{i}].path: {resolve_path(entry.path)} does not exist")
            embeddings = getattr(entry, "embeddings_dir", "")
            if embeddings and config.train.stage != 1 and not resolve_path(embeddings).is_dir():
                problems.append(f"data.{key}[{i}].embeddings_dir: {resolve_path(embeddings)} does not exist: "
                                "run process_embeddings.py first (see README, stage 2)")
    if config.train.init_from and not resolve_path(config.train.init_from).is_dir():
        problems.append(f"train.init_from: {resolve_path(config.train.init_from)} does not exist "
                        f"(train stage {config.train.stage - 1} first, or set train.init_from)")
    extra = config.train.deepspeed_config
    if extra is not None and not resolve_path(extra).is_file():
        problems.append(f"train.deepspeed_config: {extra} not found under the project root ({project_root()})")
    if problems:
        raise ConfigError("missing inputs:\n  " + "\n  ".join(problems))
    read_deepspeed_file(config)  # malformed JSON or a key the run config sets stops here, not after the model loads
    if config.model.tuning == "lora":
        check_lora_targets(config.model, llm)


def check_lora_targets(model: ModelConfig, llm: Path) -> None:
    """``model.lora.target_modules`` name linear layers of the LLM: checked on an empty (meta
    device) copy built from its config.json, so before any weight is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from toollmm.model.families import ALL_LINEAR, lora_targets

    llm_config = AutoConfig.from_pretrained(llm)
    try:
        targets = lora_targets(model.lora, llm_config.model_type)
    except ValueError as err:  # a family without a row and no override
        raise ConfigError(f"model.lora.target_modules: {err}") from None
    if targets == ALL_LINEAR:
        return
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(llm_config)
    full = [name for name, m in empty.named_modules() if isinstance(m, torch.nn.Linear)]
    linear = sorted({name.rsplit(".", 1)[-1] for name in full})
    # PEFT matches a name against the end of a module's dotted path.
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in full)]
    if unknown:
        raise ConfigError(f"model.lora.target_modules: {unknown} are not linear layers of {llm}; its linear layers "
                          f"are {linear}")


DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "train.micro_batch_size × train.gradient_accumulation_steps × world size",
    "gradient_clipping": "train.gradient_clipping",
    "bf16.enabled": "model.dtype",
    "bf16.check_grad_overflow": "train.grad_overflow_check",
    "fp16.enabled": "model.dtype",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer": "train.offload_optimizer",
    "optimizer.params.lr": "train.learning_rate",
    "optimizer.params.betas": "train.betas",
    "optimizer.params.eps": "train.adam_eps",
    "optimizer.params.weight_decay": "train.weight_decay",
    "scheduler.params.warmup_max_lr": "train.learning_rate",
    "scheduler.params.warmup_num_steps": "train.warmup_rate and train.warmup_rule",
    "scheduler.params.total_num_steps": "the planned steps (train.epochs, train.max_steps)",
}
"""DeepSpeed config keys the run config sets, and the run config keys that set them."""


def _sets(settings: dict, dotted: str) -> bool:
    """Whether ``settings`` sets ``dotted`` (or replaces a section above it with a non-object)."""
    for part in dotted.split("."):
        if not isinstance(settings, dict):
            return True
        if part not in settings:
            return False
        settings = settings[part]
    return True


def read_deepspeed_file(config: RunConfig) -> dict:
    """The settings of the ``train.deepspeed_config`` file ({} without one), refused when it
    sets a key of ``DEEPSPEED_KEYS``: those come from the run config alone."""
    if config.train.deepspeed_config is None:
        return {}
    path = resolve_path(config.train.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"train.deepspeed_config: {path} is not readable JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object of DeepSpeed settings")
    owned = [key for key in DEEPSPEED_KEYS if _sets(ds, key)]
    if owned:
        raise ConfigError(f"train.deepspeed_config: {path} sets {', '.join(owned)}, which the run config sets ("
                          + "; ".join(f"{key}: {DEEPSPEED_KEYS[key]}" for key in owned)
                          + "): remove them from the file and set those keys instead")
    return ds

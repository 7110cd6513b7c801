"""Import the original MLLM-Tool's published delta checkpoint into a Tool_LMM checkpoint.

The original saves ``pytorch_model_<step>.pt``: a pickled dict of its trainable parameters,
named as ``named_parameters()`` names them in its model::

    llama_proj.weight, llama_proj.bias                                   (the input projector)
    llama_model.base_model.model.model.layers.<i>.self_attn.<q|k|v|o>_proj.lora_<A|B>.default.weight

(PEFT LoRA, published with r=32, alpha=32, dropout 0.1 on q/k/v/o). Here the projector is
``input_projector`` and the PEFT model is ``llm``, so a name maps by its first component
only. The file is read with ``weights_only=True``: nothing but tensors and plain containers
is unpickled.

Checks, before the base LLM is loaded (a 7B load costs a minute): every name has a known
prefix; the LoRA rank, layer count, hidden size and target modules inferred from the
tensors agree with the config and the base's ``config.json``. After the model is built: the
mapped names are exactly its trainable set and every shape matches. Each failure names
the keys and the setting to change.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from toollmm.checkpoint import save_checkpoint
from toollmm.config import RunConfig, resolve_path
from toollmm.features import encoder_identity
from toollmm.model.families import ALL_LINEAR, lora_targets
from toollmm.model.imagebind import ImageBindConfig
from toollmm.model.toollmm import build_model, checkpoint_tensors, load_trainable_state
from toollmm.output_modalities import OUTPUT_MODALITIES
from toollmm.tokenization import load_tokenizer

log = logging.getLogger(__name__)

# The original's module name → ours; the rest of each name is PEFT's and identical.
PREFIXES = {"llama_proj.": "input_projector.", "llama_model.": "llm."}
LORA_NAME = re.compile(r"^llama_model\..*\.layers\.(\d+)\.(?:[^.]+\.)*?([^.]+)\.lora_([AB])\.default\.weight$")
STEP_IN_NAME = re.compile(r"pytorch_model_(\d+)\.pt$")


class DeltaError(ValueError):
    """The delta file does not fit the configured base LLM / LoRA settings (or is not a delta file)."""


def _listed(names, limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def read_delta(path: Path) -> dict[str, torch.Tensor]:
    """The delta's tensors by their original names; refuses anything but a flat {name: tensor} dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"delta file {path} does not exist (the original writes ckpt/<version>/pytorch_model_<step>.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message names the refused class among advice to allowlist it; keep the name only.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused is None:
            raise DeltaError(f"{path} is not a file written by torch.save: {str(err).splitlines()[0]}") from err
        raise DeltaError(
            f"{path} is not a plain state dict: it holds non-tensor objects, which are not unpickled here "
            f"(weights_only=True; found {refused[1]}). Re-save only the tensors, e.g. "
            "torch.save({k: v for k, v in d.items() if isinstance(v, torch.Tensor)}, path), where you trust the file."
        ) from err
    except Exception as err:  # torch.load fails on a foreign file with KeyError, RuntimeError, EOFError...
        raise DeltaError(f"{path} is not a file written by torch.save ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DeltaError(f"{path} is not a plain state dict: it holds a {type(obj).__name__}, not a dict of name → tensor")
    others = {str(k): type(v).__name__ for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if others:
        shown = ", ".join(f"{k} ({t})" for k, t in sorted(others.items())[:6])
        raise DeltaError(
            f"{path} is not a plain state dict: entries {shown} are not tensors. The original's delta is a flat "
            "dict of its trainable parameters; if the weights are nested (e.g. under 'model'), save that dict alone."
        )
    return obj


def map_names(delta: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Original names → ours; a name with another prefix is an error naming it."""
    unknown = [name for name in delta if not name.startswith(tuple(PREFIXES))]
    if unknown:
        raise DeltaError(
            f"{source}: extra keys that are not the projector (llama_proj.*) or the LLM (llama_model.*): {_listed(unknown)}. "
            "This converter reads the MLLM-Tool delta (projector + LoRA); a model variant with more trainable parts "
            "has no counterpart in Tool_LMM."
        )
    mapped = {}
    for name, tensor in delta.items():
        prefix = next(p for p in PREFIXES if name.startswith(p))
        mapped[PREFIXES[prefix] + name[len(prefix):]] = tensor
    return mapped


def mllm_tool_name(name: str) -> str:
    ours = next(p for p in PREFIXES.values() if name.startswith(p))
    return next(o for o, p in PREFIXES.items() if p == ours) + name[len(ours):]


def check_delta_structure(delta: dict[str, torch.Tensor], config: RunConfig, source: Path, need_lora: bool = True) -> int:
    """What the tensors say about the model they came from, against the config and the base's
    config.json. Returns the projector's input size (the encoder dimension). ``need_lora``:
    refuse a file without LoRA (an MLLM-Tool delta; NExT-GPT's stage 1-2 checkpoints have none)."""
    model_config = config.model
    llm_dir = resolve_path(model_config.llm_path)
    if not (llm_dir / "config.json").is_file():
        raise DeltaError(f"--llm-path {llm_dir} has no config.json: pass the base LLM folder the delta was trained on")
    base = json.loads((llm_dir / "config.json").read_text())
    hidden, layers = base["hidden_size"], base["num_hidden_layers"]

    missing_projector = [n for n in ("llama_proj.weight", "llama_proj.bias") if n not in delta]
    if missing_projector:
        raise DeltaError(f"{source}: missing keys {_listed(missing_projector)} (the input projector); is this an MLLM-Tool delta?")
    projector = delta["llama_proj.weight"]
    encoder_dim = projector.shape[1]
    encoder_out = (ImageBindConfig.huge() if model_config.imagebind_size == "huge" else ImageBindConfig.tiny()).out_embed_dim
    if encoder_dim != encoder_out:
        raise DeltaError(
            f"{source}: llama_proj.weight takes {encoder_dim}-dim features but ImageBind-{model_config.imagebind_size} "
            f"gives {encoder_out}: the delta was trained on another encoder"
        )

    problems = []
    if projector.shape[0] != hidden:
        problems.append(
            f"llama_proj.weight maps to width {projector.shape[0]} but the base at {llm_dir} has hidden_size {hidden}: "
            "wrong base LLM (pass the --llm-path the delta was trained on)"
        )
    lora = defaultdict(dict)  # (layer, module) → {"A": shape, "B": shape}
    for name, tensor in delta.items():
        match = LORA_NAME.match(name)
        if match:
            lora[int(match[1]), match[2]][match[3]] = tuple(tensor.shape)
    if not lora and need_lora:
        raise DeltaError(
            f"{source}: no LoRA weights (llama_model.*.lora_A/B.default.weight); Tool_LMM imports the LoRA delta only"
        )
    delta_layers = sorted({layer for layer, _ in lora}) or [layers - 1]
    if delta_layers[-1] + 1 != layers:
        problems.append(
            f"the delta has LoRA on layers {delta_layers[0]}..{delta_layers[-1]} ({delta_layers[-1] + 1} layers) but the base "
            f"at {llm_dir} has num_hidden_layers={layers}: wrong base LLM (pass the --llm-path the delta was trained on)"
        )
    ranks = defaultdict(list)
    for (layer, module), shapes in lora.items():
        if "A" in shapes:
            ranks[shapes["A"][0]].append(f"layer {layer} {module}")
    if len(ranks) > 1:
        problems.append("lora_A shapes disagree on the rank: " + "; ".join(f"r={r} on {_listed(w, 3)}" for r, w in sorted(ranks.items())))
    elif ranks and next(iter(ranks)) != model_config.lora.r:
        r = next(iter(ranks))
        problems.append(
            f"the delta's LoRA rank is {r} (lora_A shapes ({r}, ...)) but model.lora.r={model_config.lora.r}: "
            f"pass model.lora.r={r} (and model.lora.alpha as it was trained; the published recipe used alpha 32)"
        )
    delta_modules = {module for _, module in lora}
    configured = lora_targets(model_config.lora, base.get("model_type", ""))
    # all-linear names no modules up front: check_against_model compares the built model's names.
    if lora and configured != ALL_LINEAR and delta_modules != set(configured):
        problems.append(
            f"the delta has LoRA on {sorted(delta_modules)} but model.lora.target_modules={sorted(configured)}: "
            f"pass model.lora.target_modules=[{','.join(sorted(delta_modules))}]"
        )
    if problems:
        raise DeltaError(f"{source} does not fit the configured model:\n  " + "\n  ".join(problems))
    return encoder_dim


def check_against_model(mapped: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: Path,
                        original_name: Callable[[str], str] | None = None) -> None:
    """Exactly the model's checkpoint names (``checkpoint_tensors``), with its shapes; names are
    reported as the delta spells them (``original_name``: ours → the file's; MLLM-Tool's by default)."""
    original_name = original_name or mllm_tool_name
    expected = set(own)
    missing, extra = expected - set(mapped), set(mapped) - expected
    problems = []
    if missing:
        problems.append(f"missing keys (trainable here, absent from the delta): {_listed(original_name(n) for n in missing)}")
    if extra:
        problems.append(f"extra keys (in the delta, not trainable here): {_listed(original_name(n) for n in extra)}")
    wrong = [f"{original_name(n)} {tuple(t.shape)} vs {tuple(own[n].shape)}" for n, t in sorted(mapped.items())
             if n in expected and own[n].shape != t.shape]
    if wrong:
        problems.append(f"shapes differ (delta vs model): {_listed(wrong, 4)}")
    if problems:
        raise DeltaError(f"{source} does not match the model built from the config:\n  " + "\n  ".join(problems))


def recorded_encoder_identity(path: Path, size: str) -> str:
    """FrozenEncoder's identity, without loading the weights; a missing file is recorded as such."""
    if not path.is_file():
        return f"imagebind-{size}-unverified ({path} absent at import)"
    return encoder_identity(path, size)


def import_delta(delta_path: Path, config: RunConfig, out_dir: Path) -> Path:
    """Read, check, load onto the base LLM and save one Tool_LMM checkpoint at ``out_dir``."""
    delta_path = Path(delta_path)
    if config.model.tuning != "lora":
        raise DeltaError(f"model.tuning={config.model.tuning}: the MLLM-Tool delta is a LoRA delta; drop the model.tuning override")
    delta = read_delta(delta_path)
    mapped = map_names(delta, delta_path)
    encoder_dim = check_delta_structure(delta, config, delta_path)

    # Build in the delta's precision so the saved weights are exactly the delta's; the
    # checkpoint's config.model.dtype decides the precision at load time.
    dtypes = {t.dtype for t in mapped.values()}
    dtype = torch.float32 if len(dtypes) != 1 else dtypes.pop()
    log.info("loading the base LLM from %s (%s)", resolve_path(config.model.llm_path), dtype)
    model = build_model(config.model, encoder_dim, dtype=dtype)
    check_against_model(mapped, checkpoint_tensors(model), delta_path)
    load_trainable_state(model, mapped, delta_path)

    step = STEP_IN_NAME.search(delta_path.name)
    progress = {"step": int(step[1]) if step else None, "imported_from": str(delta_path.resolve())}
    tokenizer = load_tokenizer(resolve_path(config.model.llm_path))
    identity = recorded_encoder_identity(resolve_path(config.model.imagebind_path), config.model.imagebind_size)
    save_checkpoint(Path(out_dir), model.eval(), config, tokenizer, progress, identity)
    log.info("imported %d tensors from %s into %s", len(mapped), delta_path, out_dir)
    return Path(out_dir)


# --------------------------------------------------------------------------- NExT-GPT
# NExT-GPT saves ``pytorch_model.pt`` the same way (every parameter with requires_grad, plus the
# projectors): llama_proj.*, the output projectors as one-element ModuleLists named per
# modality, the LoRA weights in stage 3, and the whole embedding and LM head, which its
# resize_token_embeddings after freezing the LLM left trainable (vocabulary + 38 added tokens:
# <Img>, </Img>, [IMG0..3], [VID0..23], [AUD0..7], the order and ids of ours).
NEXTGPT_PROJECTORS = {m.nextgpt_projector: m.name for m in OUTPUT_MODALITIES.values()}
NEXTGPT_VOCAB = re.compile(r"^llama_model\.(?:base_model\.model\.)?(model\.embed_tokens|lm_head)\.weight$")
VOCAB_SUFFIXES = {"model.embed_tokens": "embed_tokens.weight", "lm_head": "lm_head.weight"}


def is_nextgpt(delta: dict[str, torch.Tensor]) -> bool:
    return any(name.startswith("gen_text_hidden_fcs") for name in delta)


def split_nextgpt(delta: dict[str, torch.Tensor], source: Path) -> tuple[dict, dict]:
    """(tensors under our names except the vocabulary, the two vocabulary matrices by kind);
    any other key is an error naming it."""
    mapped, vocab, unknown = {}, {}, []
    for name, tensor in delta.items():
        vocab_match = NEXTGPT_VOCAB.match(name)
        prefix = next((p for p in NEXTGPT_PROJECTORS if name.startswith(p)), None)
        if vocab_match:
            vocab[vocab_match[1]] = tensor
            continue
        if prefix is not None:
            ours = f"output_projectors.{NEXTGPT_PROJECTORS[prefix]}." + name[len(prefix):]
        elif name.startswith("llama_proj."):
            ours = "input_projector." + name[len("llama_proj."):]
        elif LORA_NAME.match(name):
            ours = "llm." + name[len("llama_model."):]
        else:
            unknown.append(name)
            continue
        mapped[ours] = tensor
    if unknown:
        raise DeltaError(
            f"{source}: keys that are none of NExT-GPT's input projector (llama_proj.*), output projectors "
            f"(gen_text_hidden_fcs[_video|_audio].0.*), LoRA weights or embedding / LM head: {_listed(unknown)}. "
            "Projectors of several LLM layers (text_emb_to_*_layers with more than one entry) have no counterpart here."
        )
    missing = [kind for kind in VOCAB_SUFFIXES if kind not in vocab]
    if missing:
        raise DeltaError(f"{source}: no {' or '.join(f'llama_model.*{k}.weight' for k in missing)}: a NExT-GPT checkpoint "
                         "holds both vocabulary matrices (the signal-token rows are read from them)")
    return mapped, vocab


def nextgpt_name(name: str, lora: bool) -> str:
    """Our checkpoint name → NExT-GPT's (for messages)."""
    from toollmm.model.toollmm import SIGNAL_ROWS

    llm = "llama_model.base_model.model." if lora else "llama_model."
    if name in SIGNAL_ROWS:
        return llm + ("model.embed_tokens.weight" if name == SIGNAL_ROWS[0] else "lm_head.weight") + " (signal-token rows)"
    if name.startswith("output_projectors."):
        modality, rest = name[len("output_projectors."):].split(".", 1)
        return next(p for p, m in NEXTGPT_PROJECTORS.items() if m == modality) + rest
    if name.startswith("input_projector."):
        return "llama_proj." + name[len("input_projector."):]
    return "llama_model." + name[len("llm."):] if name.startswith("llm.") else name


def import_nextgpt(delta_path: Path, config: RunConfig, out_dir: Path) -> Path:
    """A NExT-GPT ``pytorch_model.pt`` → one Tool_LMM checkpoint: stage 3 (LoRA) when the file
    holds LoRA weights, else stage 2. The base-vocabulary rows are kept whole
    (``model.outputs.train_rows: all``) when they differ from the base LLM's; otherwise only the
    signal-token rows are taken. Every key is checked against the model built from the config."""
    from toollmm.model.toollmm import SIGNAL_ROWS, set_trainable, trainable_parts
    from toollmm.signal_tokens import add_signal_tokens

    delta_path = Path(delta_path)
    delta = read_delta(delta_path)
    mapped, vocab = split_nextgpt(delta, delta_path)
    has_lora = any(".lora_" in name for name in mapped)
    encoder_dim = check_delta_structure(delta, config, delta_path, need_lora=False)
    config.model.outputs.enabled = True
    config.train.stage = 3 if has_lora else 2

    tokenizer = load_tokenizer(resolve_path(config.model.llm_path))
    signal = add_signal_tokens(tokenizer, config.model.outputs)
    rows = {kind: tensor.shape[0] for kind, tensor in vocab.items()}
    if set(rows.values()) != {signal.vocab_size}:
        raise DeltaError(
            f"{delta_path}: the embedding / LM head have {rows} rows, but the base vocabulary ({signal.base_vocab_size}) "
            f"plus this config's {len(signal.names)} signal tokens make {signal.vocab_size}: set "
            "model.outputs.{image,video,audio}.signal_tokens as the checkpoint was trained (NExT-GPT: 4, 24, 8)"
        )
    dtypes = {t.dtype for t in [*mapped.values(), *vocab.values()]}
    dtype = torch.float32 if len(dtypes) != 1 else dtypes.pop()
    log.info("loading the base LLM from %s (%s)", resolve_path(config.model.llm_path), dtype)
    model = build_model(config.model, encoder_dim, dtype=dtype, stage=config.train.stage, signal=signal)
    base = signal.base_vocab_size
    bases = {"model.embed_tokens": model.llm.get_input_embeddings().weight, "lm_head": model.llm.get_output_embeddings().weight}
    drift = max(float((vocab[k][:base].float() - bases[k][:base].detach().float()).abs().max()) for k in bases)
    if drift > 0 and config.model.outputs.train_rows != "all":
        # NExT-GPT trained (and weight-decayed) every row: keeping only the signal rows would
        # change the model. Nothing trains here, so switching the parts after the build is safe.
        log.warning("the checkpoint's base-vocabulary rows differ from %s (max |difference| %.3g): importing both "
                    "matrices whole (model.outputs.train_rows=all)", config.model.llm_path, drift)
        config.model.outputs.train_rows = "all"
        set_trainable(model, trainable_parts(config.train.stage, config.model))
    own = checkpoint_tensors(model)
    for kind, suffix in VOCAB_SUFFIXES.items():
        row_key = SIGNAL_ROWS[0] if kind == "model.embed_tokens" else SIGNAL_ROWS[1]
        mapped[row_key] = vocab[kind][base:]
        for name in own:
            if name.startswith("llm.") and name.endswith(suffix):
                mapped[name] = vocab[kind]
    check_against_model(mapped, own, delta_path, lambda name: nextgpt_name(name, has_lora))
    load_trainable_state(model, mapped, delta_path)

    progress = {"step": None, "imported_from": str(delta_path.resolve()), "format": "nextgpt"}
    identity = recorded_encoder_identity(resolve_path(config.model.imagebind_path), config.model.imagebind_size)
    save_checkpoint(Path(out_dir), model.eval(), config, tokenizer, progress, identity)
    log.info("imported %d NExT-GPT tensors from %s into %s (stage %d%s)", len(delta), delta_path, out_dir,
             config.train.stage, ", whole vocabulary matrices" if config.model.outputs.train_rows == "all" else "")
    return Path(out_dir)

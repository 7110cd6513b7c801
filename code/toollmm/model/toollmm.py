"""The composed model: input projector + LLM (LoRA or fully tuned) + output projectors, and what trains.

The frozen encoder is not part of this module: its features are computed once and cached
(``toollmm.features``), so the training engine only ever sees the parts that can train.
With ``model.outputs.enabled`` the LLM's vocabulary grows by the signal tokens and one output
projector per output modality maps a signal-token run's states to its decoder's conditioning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from toollmm.config import ModelConfig, resolve_path
from toollmm.model.families import lora_targets
from toollmm.model.flex_mask import use_dynamic_block_masks
from toollmm.model.projectors import build_output_projector
from toollmm.output_modalities import OUTPUT_MODALITIES
from toollmm.prompts import IGNORE_INDEX, MEDIA_SLOT_ID
from toollmm.signal_tokens import SignalTokens, find_runs

log = logging.getLogger(__name__)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIGNAL_ROWS = ("signal_rows.input_embeddings", "signal_rows.output_embeddings")
"""Checkpoint keys of the added vocabulary rows (embedding and LM head): only these rows, not the matrices."""


class ToolLMM(nn.Module):
    def __init__(self, llm: nn.Module, input_projector: nn.Linear, output_projectors: nn.ModuleDict | None = None,
                 signal: SignalTokens | None = None, config: ModelConfig | None = None):
        super().__init__()
        self.llm = llm
        self.input_projector = input_projector
        self.output_projectors = output_projectors
        self.signal = signal
        self.outputs_config = config.outputs if config is not None else None
        self.parts: set[str] = set()
        """What trains (``trainable_parts``), set by ``set_trainable``."""
        self.answer_logits_only = False
        """Training speed-up (``train.answer_logits_only``): with labels, the LM head runs on the
        answer positions only and no full logits are returned."""

    def embed_inputs(self, input_ids: torch.Tensor, slot_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each media slot replaced by its projected feature.

        Slots are filled in row-major order: ``slot_features[i]`` goes to the i-th slot of
        the flattened batch.
        """
        slots = input_ids == MEDIA_SLOT_ID
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(slots, 0))
        n_slots = int(slots.sum())
        if n_slots:
            if slot_features is None or slot_features.shape[0] != n_slots:
                got = None if slot_features is None else slot_features.shape[0]
                raise ValueError(f"batch has {n_slots} media slots but {got} features")
            projected = self.input_projector(slot_features.to(self.input_projector.weight.dtype))
            embeds = embeds.clone()
            embeds[slots] = projected.to(embeds.dtype)
        elif self.training:
            # No media in this micro-batch: the projector runs on zero rows, as it runs on a rank
            # with media (see forward), and adds 0 to the embeddings.
            nothing = self.input_projector(embeds.new_zeros(0, self.input_projector.in_features,
                                                            dtype=self.input_projector.weight.dtype))
            embeds = embeds + nothing.sum().to(embeds.dtype) * 0.0
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        slot_features: torch.Tensor | None = None,
        targets: dict[str, torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """LM loss on the answer tokens, plus, for each output modality in ``targets`` (modality →
        caption embeddings), the scaled alignment loss between the projected signal-token runs and
        those embeddings (one per run, runs in row-major order). Packed rows (``PackingCollator``)
        come with ``position_ids`` and no ``attention_mask``."""
        targets = targets or {}
        if targets and labels is None:
            raise ValueError("caption-embedding targets need labels (they locate the signal-token runs)")
        embeds = self.embed_inputs(input_ids, slot_features)
        if labels is not None and self.answer_logits_only:
            # The answer is a few tokens of each row: the LM head (and its fp32 logits, 32000
            # wide for Vicuna) runs there only. Same loss; the last-layer states are the body's output.
            causal_lm = self.causal_lm()
            hidden = causal_lm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=False).last_hidden_state
            result = answer_loss(causal_lm.get_output_embeddings(), hidden, labels)
        else:
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                           output_hidden_states=bool(targets))
            hidden = out.hidden_states[-1] if targets else None
            result = {"logits": out.logits}
            if labels is not None:
                result.update(causal_lm_loss(out.logits, labels))
        if labels is not None:
            result["lm_loss"] = result["loss"].detach()  # the answer tokens' mean, before the alignment terms
            self.add_alignment_losses(result, hidden, embeds, labels, targets)
        return result

    def add_alignment_losses(self, result: dict, hidden: torch.Tensor | None, embeds: torch.Tensor, labels: torch.Tensor,
                             targets: dict[str, torch.Tensor]) -> None:
        """Each targeted modality's scaled alignment term onto ``result["loss"]``, its l2 and MSE into ``result``.

        Every output projector runs on every training micro-batch, in one order, on zero runs
        where the batch has none of its modality (its loss term is then 0 × an empty sum); the
        input projector likewise in embed_inputs. Data-parallel ranks must run the same modules:
        ZeRO-2 reduces gradients in buckets filled as they arrive, and a projector without a
        gradient on one rank makes them differ ("Received data size doesn't match expected
        size"); ZeRO-3 gathers a module's weights when it runs, in the same order on all ranks.
        """
        for modality in self.output_projectors or {}:
            if modality in targets:
                prediction = self.project_runs(modality, hidden, embeds, labels)
                target = targets[modality]
                if prediction.shape[0] != target.shape[0]:
                    raise ValueError(f"batch has {prediction.shape[0]} {modality} signal-token runs but {target.shape[0]} caption embeddings")
                target = target.to(prediction.dtype).reshape(prediction.shape)
                terms = alignment_losses(prediction, target)
                config = self.outputs_config.modality(modality)
                result["loss"] = result["loss"] + config.loss_scale * terms[self.outputs_config.alignment_loss]
                result[f"l2_{modality}"], result[f"mse_{modality}"] = terms["l2"].detach(), terms["mse"].detach()
            elif self.training:
                nothing = embeds.new_zeros(0, len(self.signal.ids[modality]), embeds.shape[-1])
                result["loss"] = result["loss"] + self.output_projectors[modality](nothing, nothing).sum() * 0.0

    def project_runs(self, modality: str, hidden: torch.Tensor, embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The output projector on every ``modality`` run in the batch: (runs, target_tokens, target_dim).

        Reads the last-layer states at the run's positions plus the run tokens' input
        embeddings, as published.
        """
        run_ids = self.signal.ids[modality]
        rows, starts = find_runs(labels, run_ids)
        positions = starts[:, None] + torch.arange(len(run_ids), device=labels.device)
        return self.output_projectors[modality](hidden[rows[:, None], positions], embeds[rows[:, None], positions])

    def causal_lm(self) -> nn.Module:
        """The transformers causal LM, under PEFT's wrapper if any (LoRA stays injected in it)."""
        return self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm

    def decoder_layers(self) -> nn.ModuleList:
        return self.causal_lm().model.layers

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Per batch: recompute the decoder layers in the backward pass or not. transformers'
        checkpointing wraps each layer's ``__call__``, outside what ``layer.compile()`` compiles:
        the recompute reruns the compiled forward. (A checkpoint inside the compiled forward
        failed in inductor's partitioner on CUDA, torch 2.11: "Node mm_31 was invalid, but is
        output".)"""
        if not hasattr(self.decoder_layers()[0], "_gradient_checkpointing_func"):  # installed once
            # Non-reentrant: the frozen base's inputs need no grad for the recomputation to work.
            self.causal_lm().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in self.decoder_layers():
            layer.gradient_checkpointing = enabled

    def merge_lora(self) -> None:
        """Fold LoRA into the base weights, for inference: the same function up to the weights'
        rounding, without LoRA's extra matmuls and module calls in every decoding step (on a
        7B model those launches, not the GPU, bound the decoding speed)."""
        if isinstance(self.llm, PeftModel):
            self.llm = self.llm.merge_and_unload()

    def vocab_weights(self) -> list[nn.Parameter]:
        """The input-embedding and LM-head matrices (one, when they are tied)."""
        weights = [self.llm.get_input_embeddings().weight, self.llm.get_output_embeddings().weight]
        return weights[:1] if weights[0] is weights[1] else weights


def alignment_losses(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """l2: mean over tokens of the Euclidean distance (what the published code minimises, under
    the name MSE); mse: mean squared error over every element."""
    diff = prediction.float() - target.float()
    return {"l2": diff.pow(2).sum(-1).sqrt().mean(), "mse": diff.pow(2).mean()}


def answer_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``causal_lm_loss`` computed from the last-layer states at the answer positions only."""
    shift_labels = labels[:, 1:]
    answer = shift_labels != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][answer]).float()
    targets = shift_labels[answer]
    if not len(targets):  # no answer token in the batch: a zero loss that still reaches the graph
        return {"loss": hidden.sum() * 0.0, "token_accuracy": torch.zeros((), device=hidden.device)}
    with torch.no_grad():
        token_accuracy = (logits.argmax(-1) == targets).float().mean()
    return {"loss": F.cross_entropy(logits, targets), "token_accuracy": token_accuracy}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next-token loss (mean over answer tokens) and token accuracy on the same positions."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        valid = shift_labels != IGNORE_INDEX
        correct = (shift_logits.argmax(-1) == shift_labels) & valid
        token_accuracy = correct.sum() / valid.sum().clamp(min=1)
    return {"loss": loss, "token_accuracy": token_accuracy}


def avoid_cudnn_attention(device: torch.device) -> None:
    """Turn off SDPA's cuDNN backend on CUDA (flash then runs). It builds an execution plan on
    the host for each new sequence length: 1.1-1.8 ms per layer call at 7B (profiled on an H100
    and an H200), and length-grouped training batches and every decoding step bring a new
    length, so the GPU waited on the host."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_llm(config: ModelConfig, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
    """The base LLM; with a CUDA ``device``, its safetensors load straight into GPU memory (a 7B
    base loaded to host memory first and then moved costs seconds more and 13 GiB of host RAM)."""
    path = resolve_path(config.llm_path)
    device = torch.device(device) if device is not None else None
    if config.attn_implementation == "flex_attention":
        use_dynamic_block_masks()
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or TORCH_DTYPES[config.dtype], attn_implementation=config.attn_implementation,
        **({"device_map": {"": device}} if device is not None and device.type != "cpu" else {}),
    )


def trainable_parts(stage: int, config: ModelConfig) -> set[str]:
    """What trains in each stage (the one rule; tests assert the resulting parameter sets).

    1: the input projector (encoder alignment). 2: output projectors and the signal-token rows
    (decoder alignment). 3: LoRA (or the whole LLM with ``tuning: full``) and the input
    projector, plus output projectors and signal-token rows when outputs are enabled.
    With ``outputs.train_rows: all`` the whole embedding and LM head train in every stage
    (``vocab_rows``) in place of the signal-token rows.
    """
    if stage == 1:
        parts = {"input_projector"}
    elif stage == 2:
        parts = {"output_projectors", "signal_rows"}
    else:
        parts = {"input_projector", "lora" if config.tuning == "lora" else "llm"}
        if config.outputs.enabled:
            parts |= {"output_projectors", "signal_rows"}
    if config.outputs.enabled and config.outputs.train_rows == "all":
        parts = (parts - {"signal_rows"}) | {"vocab_rows"}
    return parts


def build_model(config: ModelConfig, encoder_dim: int, dtype: torch.dtype | None = None, stage: int = 3,
                signal: SignalTokens | None = None, device: torch.device | str | None = None) -> ToolLMM:
    """LLM from ``config.llm_path`` (+ signal-token rows, + LoRA in stage 3 with ``tuning: lora``),
    a fresh input projector, and output projectors when ``config.outputs.enabled``; built on
    ``device`` (default: the CPU)."""
    if config.outputs.enabled != (signal is not None):
        raise ValueError("model.outputs.enabled needs the signal tokens (add_signal_tokens), and only then")
    if stage in (1, 2) and not config.outputs.enabled:
        raise ValueError(f"stage {stage} aligns the signal tokens: set model.outputs.enabled=true")
    llm = load_llm(config, dtype, device)
    fingerprint = base_fingerprint(llm)  # before any row is added or any weight trains
    if signal is not None:
        if llm.get_input_embeddings().num_embeddings != signal.base_vocab_size:
            raise ValueError(
                f"{config.llm_path} has {llm.get_input_embeddings().num_embeddings} embedding rows but its tokenizer "
                f"has {signal.base_vocab_size} tokens before the signal tokens; use the tokenizer saved with this LLM"
            )
        llm.resize_token_embeddings(signal.vocab_size)
    parts = trainable_parts(stage, config)
    if "lora" in parts:
        llm = get_peft_model(
            llm,
            PeftLoraConfig(
                task_type="CAUSAL_LM",
                r=config.lora.r,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=lora_targets(config.lora, llm.config.model_type),
            ),
            # PEFT would keep the adapters in fp32 under a bf16/fp16 base. DeepSpeed casts the
            # whole module to the training dtype under ZeRO-1/2 anyway, but not a ZeRO-3 model
            # built under zero.Init, whose optimizer then refuses the mixed dtypes.
            autocast_adapter_dtype=False,
        )
    hidden = llm.config.hidden_size
    projector = nn.Linear(encoder_dim, hidden).to(llm.device, llm.dtype)
    outputs = None
    if config.outputs.enabled:
        outputs = nn.ModuleDict({
            m: build_output_projector(hidden, config.outputs.modality(m), config.outputs.projector)
            for m in OUTPUT_MODALITIES
        }).to(llm.device, llm.dtype)
    model = ToolLMM(llm, projector, outputs, signal, config)
    model.base_fingerprint = fingerprint
    set_trainable(model, parts)
    return model


FINGERPRINT_SAMPLES = 1 << 16
"""Elements hashed per tensor: a few milliseconds at 7B, yet any other fine-tune of the same
shape differs in them."""


def base_fingerprint(llm) -> str | None:
    """SHA-256 of a strided sample of the base's input embeddings and last decoder layer's
    weights, as bf16 (the same for a base loaded in fp32 or bf16); None under ZeRO-3, whose
    ranks hold shards only."""
    import hashlib

    layer = [p for p in llm.model.layers[-1].parameters()] if hasattr(llm, "model") and hasattr(llm.model, "layers") else []
    tensors = [llm.get_input_embeddings().weight, *layer]
    if any(hasattr(t, "ds_id") for t in tensors):
        return None
    digest = hashlib.sha256()
    with torch.no_grad():
        for tensor in tensors:
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].to("cpu", torch.bfloat16)
            digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def is_trainable(name: str, parts: set[str]) -> bool:
    """Whether parameter ``name`` trains, for ``trainable_parts``. The signal-token rows are not
    a parameter of their own: ``set_trainable`` handles them."""
    if name.startswith("input_projector."):
        return "input_projector" in parts
    if name.startswith("output_projectors."):
        return "output_projectors" in parts
    if ".lora_A." in name or ".lora_B." in name:
        return "lora" in parts
    return name.startswith("llm.") and "llm" in parts


def set_trainable(model: ToolLMM, parts: set[str]) -> None:
    model.parts = set(parts)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, parts))
    if "signal_rows" in parts and "llm" not in parts:
        # The embedding and LM-head matrices train, but a gradient hook zeroes every row
        # except the signal tokens', so the base vocabulary never moves (the optimizer must not
        # apply weight decay to them either: see ``optimizer_groups``).
        base = model.signal.base_vocab_size
        for weight in model.vocab_weights():
            weight.requires_grad_(True)
            weight.register_hook(lambda grad, base=base: torch.cat([torch.zeros_like(grad[:base]), grad[base:]]))
    if "vocab_rows" in parts:
        for weight in model.vocab_weights():
            weight.requires_grad_(True)
    # ds_numel: a weight built under ZeRO-3 (deepspeed.zero.Init) holds only this rank's shard.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log.info("trainable parameters: %d of %d (%.3f%%), parts: %s", trainable, total, 100 * trainable / total,
             ", ".join(sorted(parts)))


def optimizer_groups(model: ToolLMM) -> list[dict]:
    """Trainable parameters for the optimizer; the vocabulary matrices without weight decay,
    which would otherwise shrink the frozen base rows a little every step."""
    vocab = {id(w) for w in model.vocab_weights()} if model.signal is not None and "vocab_rows" not in model.parts else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in vocab]}]
    rows = [p for p in trainable if id(p) in vocab]
    if rows:
        groups.append({"params": rows, "weight_decay": 0.0})
    return groups


def checkpoint_tensors(model: ToolLMM) -> dict[str, torch.Tensor]:
    """Everything the base LLM checkpoint does not hold, as live views: both projectors, the
    signal-token rows, and the LLM weights that train (LoRA, or all of them with ``tuning: full``).

    Frozen parts are included, so each stage's checkpoint is complete on its own (stage 2's
    carries stage 1's input projector). Vocabulary matrices that train only in their signal
    rows are included as those rows (for a 7B model the matrices would add 0.5 GB per save).
    """
    state = _whole_checkpoint_parameters(model)
    if model.signal is not None:
        base = model.signal.base_vocab_size
        state[SIGNAL_ROWS[0]] = model.llm.get_input_embeddings().weight[base:]
        state[SIGNAL_ROWS[1]] = model.llm.get_output_embeddings().weight[base:]
    return state


def _whole_checkpoint_parameters(model: ToolLMM) -> dict[str, nn.Parameter]:
    whole = model.parts & {"llm", "vocab_rows"}
    vocab = {id(w) for w in model.vocab_weights()} if not whole else set()
    state = {}
    for name, param in model.named_parameters():
        if name.startswith(("input_projector.", "output_projectors.")):
            state[name] = param
        elif name.startswith("llm.") and param.requires_grad and id(param) not in vocab:
            state[name] = param
    return state


def checkpoint_parameters(model: ToolLMM) -> list[nn.Parameter]:
    """The parameters ``checkpoint_tensors`` reads from (the vocabulary matrices whole): what
    ZeRO-3, which keeps 1/N of each on a rank, must gather before a save."""
    params = list(_whole_checkpoint_parameters(model).values())
    if model.signal is not None:
        params += [model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight]
    return params


def checkpoint_state(model: ToolLMM) -> dict[str, torch.Tensor]:
    """``checkpoint_tensors`` copied to the CPU, ready to save. The signal rows are their own
    copies: with ``tuning: full`` the whole matrices are saved too, and safetensors refuses
    tensors that share memory."""
    state = {name: t.detach().cpu().contiguous() for name, t in checkpoint_tensors(model).items()}
    for name in SIGNAL_ROWS:
        if name in state:
            state[name] = state[name].clone()
    return state


def load_trainable_state(model: ToolLMM, state: dict[str, torch.Tensor], source: Path, partial: bool = False) -> list[str]:
    """Load checkpoint weights. Exactly the names of ``checkpoint_tensors(model)`` must be present, unless
    ``partial`` (starting a stage from the previous one's checkpoint): then the checkpoint may
    lack keys (returned: they start fresh) but may not hold keys this model lacks."""
    own = checkpoint_tensors(model)  # names and shapes only: no copy of (possibly all) the LLM's weights
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if unexpected or (missing and not partial):
        raise ValueError(
            f"{source}: weights do not match this model (trains: {', '.join(sorted(model.parts))}). Missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
            "Was it trained with another model.tuning, LoRA target_modules, model.outputs or stage?"
        )
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}")
    rows = {name: state.pop(name) for name in SIGNAL_ROWS if name in state}
    model.load_state_dict(state, strict=False)
    if rows:
        base = model.signal.base_vocab_size
        with torch.no_grad():
            weights = {SIGNAL_ROWS[0]: model.llm.get_input_embeddings().weight, SIGNAL_ROWS[1]: model.llm.get_output_embeddings().weight}
            for name, tensor in rows.items():
                weights[name][base:] = tensor.to(weights[name].dtype)
    return missing

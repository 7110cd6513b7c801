"""One image through NExT-GPT's output path on a GPU, at the published shapes, from random weights.

    python bench/any_to_any_gpu.py                 # H100: Vicuna-7B-shaped LLaMA + SD-1.5-shaped decoder
    python bench/any_to_any_gpu.py --tiny          # the same code path with tiny shapes, on CPU, in seconds

prompt ids → LLM (+ LoRA, + signal-token rows) generates → the image run [IMG0]..[IMG3] is
forced after the generated tokens → one forward over prompt + response → ``ToolLMM.project_runs``
(the published 512-wide 4+4-layer transformer projector) → 77 × 768 conditioning →
StableDiffusionPipeline(prompt_embeds, negative_prompt_embeds = its encoding of "") → a 512 × 512
PNG. Everything is random-init and built on the device from configs (no downloads): the
picture is noise, the times and memory are the real shapes'. The prompt is random token ids
(no 32000-token tokenizer is needed); SD's tokenizer is the tiny byte-level one (only the empty
negative prompt goes through it).

Prints one JSON object: seconds per phase, peak GPU memory per phase and overall, shapes; writes
it and the PNG under ``$OUT`` (or ``--out``). Needs torch, transformers, peft, diffusers,
safetensors, pyyaml and this repository's ``code/`` on the path (``PYTHONPATH=code``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from make_random_llm import PRESETS  # beside this script (on the path when run as a script): the Vicuna shapes, defined once

from toollmm.config import OutputModalityConfig, OutputProjectorConfig, OutputsConfig
from toollmm.model.projectors import build_output_projector
from toollmm.model.toollmm import ToolLMM
from toollmm.output_modalities import OUTPUT_MODALITIES
from toollmm.signal_tokens import SignalTokens, run_names, token_names
from toollmm.tiny_decoders import CLIP_END, clip_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Shapes: "full" is the published setting, "tiny" the CPU check of the same code.
LLM_TINY = dict(PRESETS["vicuna-7b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
PROJECTOR = {"full": OutputProjectorConfig(), "tiny": OutputProjectorConfig(hidden_size=32, encoder_layers=1,
                                                                            decoder_layers=1, heads=2, ffn_size=64)}
CONDITIONING = {"full": (77, 768), "tiny": (77, 32)}
IMAGE_SIDE = {"full": 512, "tiny": 32}


def llm_config(size: str) -> dict:
    return dict(PRESETS["vicuna-7b"]) if size == "full" else dict(LLM_TINY)


def unet_config(size: str) -> dict:
    """SD-1.5's UNet (diffusers' UNet2DConditionModel defaults are its blocks): 859.5 M parameters."""
    if size == "full":
        return dict(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280),
                    layers_per_block=2, attention_head_dim=8)
    return dict(sample_size=16, cross_attention_dim=32, block_out_channels=(8, 8), layers_per_block=1,
                norm_num_groups=8, attention_head_dim=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def vae_config(size: str) -> dict:
    """SD-1.5's VAE: 83.7 M parameters, latents 1/8 of the image side."""
    if size == "full":
        return dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
    return dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8)


def text_encoder_config(size: str) -> dict:
    """SD-1.5's CLIP ViT-L/14 text encoder: 123.1 M parameters, 77 × 768 out. Its start/end ids are
    the tiny byte-level tokenizer's (512, 513), the one that encodes the empty negative prompt."""
    specials = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513, max_position_embeddings=77, hidden_act="quick_gelu")
    if size == "full":
        return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, projection_dim=768, **specials)
    return dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                projection_dim=32, **specials)


@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype):
    """Parameters created directly on ``device`` in ``dtype``: a 7B model never exists in CPU fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_toollmm(size: str, device: torch.device, dtype: torch.dtype, lora: bool) -> ToolLMM:
    """Random LLaMA + signal-token rows (+ the published LoRA) + the image output projector."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**llm_config(size))
    outputs = OutputsConfig(enabled=True)
    names = token_names(outputs)
    base = config.vocab_size
    ids = {m: [base + names.index(n) for n in run_names(m, outputs.modality(m).signal_tokens)] for m in OUTPUT_MODALITIES}
    signal = SignalTokens(base_vocab_size=base, ids=ids, names=names)
    target = OutputModalityConfig(4, *CONDITIONING[size])
    with built_on(device, dtype):
        llm = LlamaForCausalLM(config)
        llm.resize_token_embeddings(signal.vocab_size, mean_resizing=False)
        if lora:
            llm = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", r=32, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        projectors = nn.ModuleDict({"image": build_output_projector(config.hidden_size, target, PROJECTOR[size])})
        model = ToolLMM(llm, nn.Linear(1024, config.hidden_size), projectors, signal)
    return model.eval().requires_grad_(False)


def build_sd_pipeline(size: str, device: torch.device, dtype: torch.dtype, tokenizer_dir: Path):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    clip_tokenizer(tokenizer_dir, pad_token=CLIP_END)
    with built_on(device, dtype):
        unet = UNet2DConditionModel(**unet_config(size))
        vae = AutoencoderKL(**vae_config(size))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(size)))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)  # SD-1.5's
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class Phases:
    """Wall time and peak GPU memory of each named phase (synchronised at both ends)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peak_gib = device, {}, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
            self.peak_gib[name] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.seconds[name] = round(time.perf_counter() - start, 3)


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def run(args) -> dict:
    size = "tiny" if args.tiny else "full"
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    llm_dtype, sd_dtype = (torch.float32, torch.float32) if device.type == "cpu" else (DTYPES[args.dtype], DTYPES[args.sd_dtype])
    torch.manual_seed(args.seed)
    phases = Phases(device)
    with phases("build_llm"):
        model = build_toollmm(size, device, llm_dtype, lora=not args.no_lora)
    with phases("build_decoder"), tempfile.TemporaryDirectory() as tokenizer_dir:
        pipeline = build_sd_pipeline(size, device, sd_dtype, Path(tokenizer_dir) / "tokenizer")

    signal, base = model.signal, model.signal.base_vocab_size
    prompt = torch.randint(3, base, (1, args.prompt_tokens), device=device)
    with phases("llm_generate"):
        embeds = model.llm.get_input_embeddings()(prompt)
        generated = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(prompt),
                                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                       pad_token_id=0, top_k=None)
    run_ids = torch.tensor([signal.ids["image"]], device=device)
    response = torch.cat([generated, run_ids], 1)  # the run is forced: a random LLM would not write it
    with phases("hidden_states_and_projector"):
        ids = torch.cat([prompt, response], 1)
        embeds = model.llm.get_input_embeddings()(ids)
        hidden = model.llm(inputs_embeds=embeds, output_hidden_states=True, use_cache=False).hidden_states[-1]
        labels = torch.cat([torch.full_like(prompt, -100), response], 1)
        conditioning = model.project_runs("image", hidden, embeds, labels)  # (1, 77, 768)
    with phases("negative_embeds"):
        negative = pipeline.encode_prompt([""], device, 1, False)[0]
    side = IMAGE_SIDE[size]
    with phases("diffusion"):
        image = pipeline(prompt_embeds=conditioning.to(sd_dtype), negative_prompt_embeds=negative, height=side, width=side,
                         num_inference_steps=args.steps, guidance_scale=7.5,
                         generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="any_to_any_"))
    out.mkdir(parents=True, exist_ok=True)
    png = out / "any_to_any.png"
    image.save(png)
    result = {
        "size": size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "llm_dtype": str(llm_dtype).removeprefix("torch."), "decoder_dtype": str(sd_dtype).removeprefix("torch."),
        "parameters_m": {"llm": round(parameters(model.llm) / 1e6, 1), "projector": round(parameters(model.output_projectors) / 1e6, 1),
                         "unet": round(parameters(pipeline.unet) / 1e6, 1), "vae": round(parameters(pipeline.vae) / 1e6, 1),
                         "text_encoder": round(parameters(pipeline.text_encoder) / 1e6, 1)},
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "diffusion_steps": args.steps,
        "conditioning_shape": list(conditioning.shape), "image_size": list(image.size),
        "seconds": phases.seconds, "peak_gib": phases.peak_gib,
        "peak_gib_overall": round(torch.cuda.max_memory_reserved() / 2**30, 3) if device.type == "cuda" else None,
        "png": str(png),
    }
    (out / "any_to_any.json").write_text(json.dumps(result, indent=1))
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a check of the code path, seconds)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="LLM and projector precision on GPU")
    p.add_argument("--sd-dtype", choices=["bf16", "fp16"], default="fp16", help="decoder precision on GPU (NExT-GPT: fp16)")
    p.add_argument("--steps", type=int, default=25, help="diffusion steps")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated before the forced image run")
    p.add_argument("--no-lora", action="store_true", help="leave out the published LoRA (r 32 on q/k/v/o)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for the PNG and the JSON (default $OUT)")
    args = p.parse_args(argv)
    if args.tiny and args.steps == 25:
        args.steps = 2
    return args


def main(argv=None) -> dict:
    result = run(parse_args(argv))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

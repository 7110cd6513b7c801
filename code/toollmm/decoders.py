"""The diffusion decoders (NExT-GPT's output side): a conditioning tensor → a PNG, MP4 or WAV file.

``MediaDecoder(folder, modality, device)`` wraps one diffusers pipeline folder of the kind the
modality's registry entry names (``toollmm.output_modalities``) — Stable Diffusion 1.5 (image,
conditioning 77×768), Zeroscope (video, 77×1024) or AudioLDM (audio, 512) — loaded on the
first ``decode``. The output projector's tensor goes in as ``prompt_embeds``; the negative
embedding for classifier-free guidance is the pipeline's own encoding of the empty prompt, as
the pipelines compute it when NExT-GPT passes no negative prompt. The entry's writer runs the
pipeline and writes the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from toollmm.extras import require
from toollmm.output_modalities import OUTPUT_MODALITIES, VIDEO_FPS

log = logging.getLogger(__name__)


class MediaDecoder:
    """One diffusers decoder folder for one output modality, loaded on first use.

    ``device``: where the pipeline runs (the caller's choice). ``dtype`` defaults to float16 on
    CUDA (the published decoders' precision) and float32 elsewhere. ``offload`` keeps the
    pipeline on the CPU and moves each submodule to the GPU only while it runs
    (``enable_model_cpu_offload``: a fraction of the memory, some seconds slower per call);
    ignored off CUDA.
    """

    def __init__(self, folder: str | Path, modality: str, device: torch.device | str,
                 dtype: torch.dtype | None = None, offload: bool = False):
        if modality not in OUTPUT_MODALITIES:
            raise ValueError(f"modality {modality!r} is not one of {list(OUTPUT_MODALITIES)}")
        self.folder, self.modality, self.entry = Path(folder), modality, OUTPUT_MODALITIES[modality]
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.offload = offload and self.device.type == "cuda"
        self._pipeline = None
        self._negative: torch.Tensor | None = None

    def check_folder(self) -> None:
        """The folder is a diffusers pipeline of this modality's kind, or an error that says which to pass."""
        index = self.folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{self.folder} is not a diffusers pipeline folder (no model_index.json): pass the {self.modality} "
                f"decoder's folder (see pretrained_checkpoint/README.md; python -m toollmm.tiny_decoders builds tiny ones)")
        found = json.loads(index.read_text()).get("_class_name")
        if found != self.entry.pipeline:
            raise ValueError(f"{self.folder} holds a {found}, but the {self.modality} decoder is a {self.entry.pipeline}: "
                             f"pass the {self.modality} decoder's folder")

    @property
    def pipeline(self):
        if self._pipeline is None:
            self.check_folder()
            DiffusionPipeline = require("diffusers", f"the {self.modality} decoder").DiffusionPipeline

            pipeline = DiffusionPipeline.from_pretrained(self.folder, dtype=self.dtype)
            pipeline.set_progress_bar_config(disable=True)
            if self.offload:
                pipeline.enable_model_cpu_offload(device=self.device)
            else:
                pipeline.to(self.device)
            self._pipeline = pipeline
            log.info("loaded the %s decoder %s (%s) on %s", self.modality, self.folder, type(pipeline).__name__, self.device)
        return self._pipeline

    @property
    def execution_device(self) -> torch.device:
        return self.pipeline._execution_device

    @torch.no_grad()
    def negative_embeds(self) -> torch.Tensor:
        """The pipeline's encoding of the empty prompt, (1, 77, dim) or (1, 512) for AudioLDM; computed once."""
        if self._negative is None:
            self._negative = self.entry.empty_prompt(self.pipeline, self.execution_device)
        return self._negative

    @torch.no_grad()
    def decode(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None, *,
               out_path: str | Path, seed: int = 0, steps: int = 25, guidance_scale: float = 7.5, **options) -> Path:
        """Generate one output from ``prompt_embeds`` and write it to ``out_path`` (its suffix set to
        the modality's: .png, .mp4 or .wav). ``options`` go to the pipeline (height, width,
        num_frames, audio_length_in_s, ...), over the entry's ``decode_options``; ``fps`` sets the
        MP4's frame rate. Guidance 7.5 is NExT-GPT's for all three decoders."""
        pipeline, encoding = self.pipeline, self.entry.text_encoding
        fps = options.pop("fps", VIDEO_FPS)
        prompt_embeds = encoding.batch_of_one(prompt_embeds).to(self.execution_device, self.dtype)
        negative = self.negative_embeds() if negative_prompt_embeds is None else encoding.batch_of_one(negative_prompt_embeds)
        negative = negative.to(self.execution_device, self.dtype)
        # A CPU generator: the same seed gives the same initial noise on every device.
        generator = torch.Generator("cpu").manual_seed(seed)
        arguments = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, num_inference_steps=steps,
                         guidance_scale=guidance_scale, generator=generator, **{**self.entry.decode_options, **options})
        out_path = Path(out_path).with_suffix(self.entry.suffix)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        self.entry.write(pipeline, arguments, out_path, fps=fps)
        return out_path

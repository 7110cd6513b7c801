"""The diffusion decoders (NExT-GPT's output side): a conditioning tensor → a PNG, MP4 or WAV file.

``MediaDecoder(folder, modality)`` wraps one diffusers pipeline folder — Stable Diffusion 1.5
(image, conditioning 77×768), Zeroscope (video, 77×1024) or AudioLDM (audio, 512) — loaded on
the first ``decode``. The output projector's tensor goes in as ``prompt_embeds``; the
negative embedding for classifier-free guidance is the pipeline's own encoding of the empty
prompt, as the pipelines compute it when NExT-GPT passes no negative prompt.

Videos are written as H.264 MP4 (yuv420p, what browsers play) through PyAV (``av`` in the
[decoders] extra; torchvision 0.26 no longer writes video).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from toollmm.extras import require

log = logging.getLogger(__name__)

SUFFIXES = {"image": ".png", "video": ".mp4", "audio": ".wav"}
# NExT-GPT's demo values: guidance 7.5 for all three decoders (the ``decode`` default), 24 video
# frames, 9 s of audio. Height and width stay the decoder's own (NExT-GPT asked Zeroscope for
# 320 × 576: pass height/width to ``decode`` for that).
DEFAULT_OPTIONS = {"image": {}, "video": {"num_frames": 24}, "audio": {"audio_length_in_s": 9.0}}
VIDEO_FPS = 8


class MediaDecoder:
    """One diffusers decoder folder for one output modality, loaded on first use.

    ``device`` defaults to CUDA when available; ``dtype`` to float16 there (the published
    decoders' precision) and float32 on CPU. ``offload`` keeps the pipeline on the CPU and
    moves each submodule to the GPU only while it runs (``enable_model_cpu_offload``: a
    fraction of the memory, some seconds slower per call); ignored on CPU.
    """

    def __init__(self, folder: str | Path, modality: str, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, offload: bool = False):
        if modality not in SUFFIXES:
            raise ValueError(f"modality {modality!r} is not one of {list(SUFFIXES)}")
        self.folder, self.modality = Path(folder), modality
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.offload = offload and self.device.type == "cuda"
        self._pipeline = None
        self._negative: torch.Tensor | None = None

    @property
    def pipeline(self):
        if self._pipeline is None:
            if not (self.folder / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"{self.folder} is not a diffusers pipeline folder (no model_index.json): pass the {self.modality} "
                    f"decoder's folder (see pretrained_checkpoint/README.md; python -m toollmm.tiny_decoders builds tiny ones)")
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
            pipeline = self.pipeline
            if self.modality == "audio":
                self._negative = pipeline._encode_prompt([""], self.execution_device, 1, False)
            else:
                self._negative = pipeline.encode_prompt([""], self.execution_device, 1, False)[0]
        return self._negative

    def conditioning_shape(self, embeds: torch.Tensor) -> torch.Tensor:
        """(77, dim) or (512,) or (1, 1, 512) → the batch-of-one shape the pipeline takes."""
        if self.modality == "audio":
            return embeds.reshape(1, -1)
        return embeds.reshape(1, *embeds.shape[-2:])

    @torch.no_grad()
    def decode(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None, *,
               out_path: str | Path, seed: int = 0, steps: int = 25, guidance_scale: float = 7.5, **options) -> Path:
        """Generate one output from ``prompt_embeds`` and write it to ``out_path`` (its suffix set to
        .png, .mp4 or .wav). ``options`` go to the pipeline (height, width, num_frames,
        audio_length_in_s, ...), over ``DEFAULT_OPTIONS``; ``fps`` sets the MP4's frame rate."""
        pipeline = self.pipeline
        fps = options.pop("fps", VIDEO_FPS)
        prompt_embeds = self.conditioning_shape(prompt_embeds).to(self.execution_device, self.dtype)
        negative = self.negative_embeds() if negative_prompt_embeds is None else self.conditioning_shape(negative_prompt_embeds)
        negative = negative.to(self.execution_device, self.dtype)
        # A CPU generator: the same seed gives the same initial noise on every device.
        generator = torch.Generator("cpu").manual_seed(seed)
        kwargs = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=generator, **{**DEFAULT_OPTIONS[self.modality], **options})
        out_path = Path(out_path).with_suffix(SUFFIXES[self.modality])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if self.modality == "image":
            pipeline(**kwargs, output_type="pil").images[0].save(out_path)
        elif self.modality == "video":
            frames = pipeline(**kwargs, output_type="np").frames[0]  # (frames, H, W, 3) in [0, 1]
            write_mp4(to_uint8(frames), out_path, fps)
        else:
            import soundfile

            audio = pipeline(**kwargs, output_type="np").audios[0]
            soundfile.write(out_path, np.asarray(audio, dtype=np.float32), pipeline.vocoder.config.sampling_rate)
        return out_path


def to_uint8(frames) -> np.ndarray:
    frames = frames.float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames, dtype=np.float32)
    return (frames.clip(0, 1) * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------- MP4 writing


def write_mp4(frames: np.ndarray, path: Path, fps: int = VIDEO_FPS) -> Path:
    """(frames, H, W, 3) uint8 → an H.264 MP4 (PyAV)."""
    av = require("av", "writing a generated video as MP4")

    height, width = frames.shape[1:3]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        # yuv420p, what browsers play, needs even sides: odd ones lose their last row/column.
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return path

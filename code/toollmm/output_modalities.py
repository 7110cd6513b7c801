"""The output-modality registry (NExT-GPT's output side): one entry per medium the model can generate.

An entry says how the LLM asks for its medium (a run of signal tokens, ``[IMG0]..[IMG3]``), what
the output projector must produce (the decoder's text conditioning), which diffusers pipeline
turns that into media, how the pipeline's text encoder makes the caption-embedding targets, and
how the result is written (PNG, MP4, WAV). The config defaults, the signal tokens, the output
projectors, the checkpoints, the caption embeddings, the decoders and the demo all iterate over
``OUTPUT_MODALITIES``, in its order (the order of the signal tokens in the tokenizer).

``toollmm.config`` imports this module, so it loads no heavy library: torch, numpy and the
media writers' libraries are imported inside the callables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

VIDEO_FPS = 8
"""Frame rate of written videos (NExT-GPT's demo)."""


@dataclass(frozen=True)
class TextEncoding:
    """How a decoder's text encoder turns a caption into the conditioning its pipeline takes."""

    architecture: str
    """``architectures[0]`` of the decoder folder's ``text_encoder/config.json``."""
    tokenizer: str
    """transformers tokenizer class of its ``tokenizer/``."""
    short_name: str
    """Leads the caption-embedding identities (``clip-77x768-...``): another name orphans stored embeddings."""
    pooled: bool
    """One vector per caption (CLAP's projected text embedding), not the states of every token position."""
    encode: Callable[[Any, Any, Any], Any]
    """(text encoder, token ids, attention mask) → the batch's conditioning, as the pipeline computes it."""

    def shape(self, tokens: int, dim: int) -> tuple[int, ...]:
        """One caption's conditioning: (tokens, dim), or (dim,) when pooled."""
        return (dim,) if self.pooled else (tokens, dim)

    def encoder_shape(self, encoder_config, max_length: int) -> tuple[int, ...]:
        """What the text encoder gives per caption, read from its config and the tokenizer's length."""
        return (encoder_config.projection_dim,) if self.pooled else (max_length, encoder_config.hidden_size)

    def batch_of_one(self, embeds):
        """One conditioning, e.g. (77, 768), (1, 77, 768), (512,) or (1, 1, 512) → the pipeline's batch of one."""
        kept = 1 if self.pooled else 2
        return embeds.reshape(1, *embeds.shape[-kept:])


@dataclass(frozen=True)
class OutputModality:
    name: str
    token_prefix: str
    """The run's tokens are ``[<prefix>0]..[<prefix><n-1>]`` (the published names)."""
    signal_tokens: int
    """Published run length: the default of ``model.outputs.<name>.signal_tokens``."""
    target_tokens: int
    target_dim: int
    """The decoder's conditioning: defaults of ``model.outputs.<name>.target_tokens/target_dim``."""
    decoder_path: str
    """The published decoder's folder: the default of ``model.outputs.<name>.decoder_path``."""
    pipeline: str
    """The diffusers pipeline class the decoder folder's ``model_index.json`` names."""
    text_encoding: TextEncoding
    empty_prompt: Callable[[Any, Any], Any]
    """(pipeline, device) → the pipeline's encoding of "": the negative of classifier-free guidance."""
    suffix: str
    write: Callable[..., None]
    """(pipeline, arguments, path, fps=) → runs the pipeline and writes its output to ``path``."""
    display: str
    """The Gradio component that shows the written file in the demo."""
    nextgpt_projector: str
    """Key prefix of this modality's output projector in NExT-GPT's checkpoints."""
    decode_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Pipeline arguments of NExT-GPT's demo, over the pipeline's own defaults."""


# --------------------------------------------------------------------------- text encoders


def token_states(text_encoder, ids, mask):
    """CLIP (SD 1.5, Zeroscope): the last hidden state at every position, the padding's too. The
    pipelines pass the mask only when the encoder's config asks (no released CLIP does)."""
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    return text_encoder(ids, attention_mask=mask if use_mask else None)[0]


def pooled_text_embeds(text_encoder, ids, mask):
    """CLAP (AudioLDM): the projected text embedding, L2-normalised, as AudioLDM's pipeline does."""
    from torch.nn.functional import normalize

    return normalize(text_encoder(ids, attention_mask=mask).text_embeds, dim=-1)


CLIP_TOKEN_STATES = TextEncoding("CLIPTextModel", "CLIPTokenizer", "clip", pooled=False, encode=token_states)
CLAP_POOLED = TextEncoding("ClapTextModelWithProjection", "RobertaTokenizer", "clap", pooled=True, encode=pooled_text_embeds)


def encode_empty_prompt(pipeline, device):
    # encode_prompt returns (positive, negative); without guidance the negative is None.
    return pipeline.encode_prompt([""], device, 1, False)[0]


def encode_empty_prompt_audioldm(pipeline, device):
    # AudioLDMPipeline has only the private _encode_prompt, which returns one tensor.
    return pipeline._encode_prompt([""], device, 1, False)


# --------------------------------------------------------------------------- media writers


def write_image(pipeline, arguments: dict, path: Path, fps: int = VIDEO_FPS) -> None:
    pipeline(**arguments, output_type="pil").images[0].save(path)


def write_video(pipeline, arguments: dict, path: Path, fps: int = VIDEO_FPS) -> None:
    frames = pipeline(**arguments, output_type="np").frames[0]  # (frames, H, W, 3) in [0, 1]
    write_mp4(to_uint8(frames), path, fps)


def write_audio(pipeline, arguments: dict, path: Path, fps: int = VIDEO_FPS) -> None:
    import numpy as np
    import soundfile

    audio = pipeline(**arguments, output_type="np").audios[0]
    soundfile.write(path, np.asarray(audio, dtype=np.float32), pipeline.vocoder.config.sampling_rate)


def to_uint8(frames):
    """Frames in [0, 1] (a tensor or an array) → uint8 (numpy)."""
    import numpy as np

    frames = frames.float().cpu().numpy() if hasattr(frames, "cpu") else np.asarray(frames, dtype=np.float32)
    return (frames.clip(0, 1) * 255).round().astype(np.uint8)


def write_mp4(frames, path: Path, fps: int = VIDEO_FPS) -> Path:
    """(frames, H, W, 3) uint8 → an H.264 MP4 (yuv420p, what browsers play) through PyAV (``av`` in the
    [decoders] extra; torchvision 0.26 no longer writes video)."""
    import numpy as np

    from toollmm.extras import require

    av = require("av", "writing a generated video as MP4")
    height, width = frames.shape[1:3]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        # yuv420p needs even sides: odd ones lose their last row/column.
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return path


# --------------------------------------------------------------------------- the registry

DIFFUSION_CKPT = "pretrained_checkpoint/diffusion_ckpt"

# decode_options are NExT-GPT's demo values. Height and width stay the decoder's own (NExT-GPT
# asked Zeroscope for 320 × 576: pass height/width to MediaDecoder.decode for that).
OUTPUT_MODALITIES: dict[str, OutputModality] = {
    m.name: m
    for m in (
        OutputModality(
            name="image", token_prefix="IMG", signal_tokens=4, target_tokens=77, target_dim=768,
            decoder_path=f"{DIFFUSION_CKPT}/stable-diffusion-v1-5", pipeline="StableDiffusionPipeline",
            text_encoding=CLIP_TOKEN_STATES, empty_prompt=encode_empty_prompt,
            suffix=".png", write=write_image, display="Image", nextgpt_projector="gen_text_hidden_fcs.0.",
        ),
        OutputModality(
            name="video", token_prefix="VID", signal_tokens=24, target_tokens=77, target_dim=1024,
            decoder_path=f"{DIFFUSION_CKPT}/zeroscope_v2_576w", pipeline="TextToVideoSDPipeline",
            text_encoding=CLIP_TOKEN_STATES, empty_prompt=encode_empty_prompt, decode_options=MappingProxyType({"num_frames": 24}),
            suffix=".mp4", write=write_video, display="Video", nextgpt_projector="gen_text_hidden_fcs_video.0.",
        ),
        OutputModality(
            name="audio", token_prefix="AUD", signal_tokens=8, target_tokens=1, target_dim=512,
            decoder_path=f"{DIFFUSION_CKPT}/audioldm-l-full", pipeline="AudioLDMPipeline",
            # AudioLDM conditions on CLAP's one pooled vector, and its pipeline encodes "" its own way.
            text_encoding=CLAP_POOLED, empty_prompt=encode_empty_prompt_audioldm,
            decode_options=MappingProxyType({"audio_length_in_s": 9.0}),
            suffix=".wav", write=write_audio, display="Audio", nextgpt_projector="gen_text_hidden_fcs_audio.0.",
        ),
    )
}

"""Media files -> ImageBind input tensors, matching Meta's reference preprocessing.

The reference is ``imagebind/data.py`` (with pytorchvideo's clip sampler, decord reader,
``ShortSideScale`` and ``UniformTemporalSubsample``); the steps and their order are kept
so that the tensors agree with it to float rounding. Deliberate differences in *how*, not
*what*: WAV files are read with ``soundfile`` (``torchaudio.load`` needs torchcodec here;
both scale int16 by 1/32768), and a video clip decodes only the two frames it keeps
instead of every frame between its start and end.

Shapes:

* ``load_image`` -> ``[3, 224, 224]``
* ``load_audio`` -> ``[3, 1, 128, 204]``  (3 clips of 2 s, log-mel)
* ``load_video`` -> ``[15, 3, 2, 224, 224]``  (5 clips x 3 spatial crops, clip-major)
"""

from __future__ import annotations

import logging
import math
import os
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from toollmm.config import MediaLimits

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224

AUDIO_SAMPLE_RATE = 16_000
AUDIO_CLIP_SECONDS = 2
AUDIO_CLIPS = 3
AUDIO_MEL_BINS = 128
AUDIO_TARGET_LEN = 204
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138
_FBANK_FRAME_LENGTH_MS = 25
_FBANK_FRAME_SHIFT_MS = 10

VIDEO_CLIP_SECONDS = 2
VIDEO_CLIPS = 5
VIDEO_FRAMES_PER_CLIP = 2
VIDEO_CROPS = 3


LIMITS = MediaLimits()
"""The bounds every decode checks first; ``set_limits`` installs a config's (DataLoader workers
fork after it and inherit them)."""


def set_limits(limits: MediaLimits) -> None:
    global LIMITS
    LIMITS = limits


class MediaError(ValueError):
    """A media file is missing or cannot be decoded."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise MediaError(path, f"{what}; check the media path (and media_root) in the data file")
    return path


def _constant_clip_starts(duration: float, clip_seconds: int, clips: int) -> list[Fraction]:
    """Start times of the reference's constant-clips sampler: ``clips`` clips spread evenly
    over [0, duration - clip_seconds], in exact fractions (the reference converts to frame
    and sample indices from these, so float rounding here would shift an index)."""
    last_start = Fraction(max(duration - clip_seconds, 0))
    step = last_start / clips
    return [step * i for i in range(clips)]


# --------------------------------------------------------------------------- image


@lru_cache(maxsize=1)
def _image_transform():
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(IMAGE_SIZE),
            transforms.ToTensor(),
            transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        ]
    )


def load_image(path: str | os.PathLike) -> Tensor:
    """RGB image -> ``[3, 224, 224]`` float32: bicubic short-side resize, centre crop, CLIP norm."""
    from PIL import Image

    path = _require_file(path)
    try:
        with Image.open(path) as img:
            width, height = img.size  # from the header: nothing decoded yet
            if width * height > LIMITS.max_image_pixels:
                raise MediaError(path, f"image is {width} × {height} pixels, over data.media_limits.max_image_pixels="
                                       f"{LIMITS.max_image_pixels}; shrink it or raise the limit")
            rgb = img.convert("RGB")  # forces the decode while the file is open
    except MediaError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own bound, 2 × 89.5 M pixels, checked at open
        raise MediaError(path, f"image is over data.media_limits.max_image_pixels={LIMITS.max_image_pixels} ({err}); "
                               "shrink it") from None
    except (OSError, ValueError) as err:
        raise MediaError(path, f"not a readable image ({err}); re-encode it as JPEG/PNG or drop the row") from err
    return _image_transform()(rgb)


# --------------------------------------------------------------------------- audio


def _read_wav(path: Path) -> tuple[Tensor, int]:
    import soundfile as sf

    try:
        info = sf.info(str(path))  # the header only
    except (RuntimeError, TypeError, ValueError, sf.LibsndfileError) as err:
        raise MediaError(path, f"not a readable audio file ({err}); convert it to WAV or drop the row") from err
    check_audio_header(path, info.samplerate, info.channels, info.frames)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError, sf.LibsndfileError) as err:
        raise MediaError(path, f"not a readable audio file ({err}); convert it to WAV or drop the row") from err
    if data.shape[0] == 0:
        raise MediaError(path, "audio file holds no samples")
    if not np.isfinite(data).all():
        raise MediaError(path, "audio samples hold NaN or infinite values; re-export the file or drop the row")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)  # [channels, samples]


def check_audio_header(path: Path, rate: int, channels: int, frames: int) -> None:
    limits = LIMITS
    problem = None
    if not limits.min_audio_sample_rate <= rate <= limits.max_audio_sample_rate:
        problem = (f"sample rate {rate} Hz is outside data.media_limits ({limits.min_audio_sample_rate}-"
                   f"{limits.max_audio_sample_rate} Hz)")
    elif channels > limits.max_audio_channels:
        problem = f"{channels} channels, over data.media_limits.max_audio_channels={limits.max_audio_channels}"
    elif frames / rate > limits.max_audio_seconds:
        problem = f"{frames / rate:.0f} s long, over data.media_limits.max_audio_seconds={limits.max_audio_seconds:g}"
    if problem:
        raise MediaError(path, f"audio header says {problem}: not decoded; resample or cut it, or raise the limit")


def _melspec(segment: Tensor) -> Tensor:
    """One clip [channels, samples] -> [1, 128, 204] kaldi log-mel, unnormalised."""
    from torchaudio.compliance import kaldi

    # In place, as the reference: ``segment`` is a view of the whole waveform, so when
    # clips overlap (audio shorter than 6 s) a later clip sees samples from which an
    # earlier clip's mean was already subtracted. Kept for bit-parity with the reference.
    # The mean is over all channels, but kaldi.fbank reads only channel 0: stereo files
    # are encoded from their left channel, as the reference does.
    segment -= segment.mean()
    fbank = kaldi.fbank(
        segment,
        htk_compat=True,
        sample_frequency=AUDIO_SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=AUDIO_MEL_BINS,
        dither=0.0,
        frame_length=_FBANK_FRAME_LENGTH_MS,
        frame_shift=_FBANK_FRAME_SHIFT_MS,
    ).T  # [mel, frames]
    frames = fbank.shape[1]
    if abs(AUDIO_TARGET_LEN - frames) / frames > 0.2:
        log.debug("audio clip has %d fbank frames, padded/cut to %d", frames, AUDIO_TARGET_LEN)
    if frames < AUDIO_TARGET_LEN:
        fbank = F.pad(fbank, (0, AUDIO_TARGET_LEN - frames))  # zeros before normalisation, as the reference
    return fbank[:, :AUDIO_TARGET_LEN].unsqueeze(0)


def load_audio(path: str | os.PathLike) -> Tensor:
    """Audio file -> ``[3, 1, 128, 204]`` float32: 16 kHz, three 2 s clips, normalised log-mel."""
    import torchaudio.functional as AF

    path = _require_file(path)
    waveform, sr = _read_wav(path)
    if sr != AUDIO_SAMPLE_RATE:
        waveform = AF.resample(waveform, orig_freq=sr, new_freq=AUDIO_SAMPLE_RATE)
    window = int(AUDIO_SAMPLE_RATE * _FBANK_FRAME_LENGTH_MS / 1000)
    if waveform.shape[1] < window:
        raise MediaError(path, f"audio is {waveform.shape[1] / AUDIO_SAMPLE_RATE * 1000:.1f} ms long, shorter than one 25 ms analysis window")
    duration = waveform.shape[1] / AUDIO_SAMPLE_RATE
    clips = []
    for start in _constant_clip_starts(duration, AUDIO_CLIP_SECONDS, AUDIO_CLIPS):
        end = start + AUDIO_CLIP_SECONDS
        segment = waveform[:, int(start * AUDIO_SAMPLE_RATE) : int(end * AUDIO_SAMPLE_RATE)]
        clips.append(_melspec(segment))
    return (torch.stack(clips) - AUDIO_MEAN) / AUDIO_STD


# --------------------------------------------------------------------------- video


def _short_side_scale(video: Tensor, size: int) -> Tensor:
    """[C,T,H,W] -> short side ``size``, long side floored; bilinear without antialias, as
    pytorchvideo's ``ShortSideScale`` (which interpolates with C as batch, T as channels)."""
    h, w = video.shape[-2:]
    if w < h:
        new_h, new_w = int(math.floor(h / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(w / h * size))
    return F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False)


def _three_crops(video: Tensor, size: int) -> list[Tensor]:
    """Start / centre / end square crops along the long side of a [C,T,H,W] clip
    (left/centre/right for landscape, top/centre/bottom for portrait)."""
    h, w = video.shape[-2:]
    y_mid, x_mid = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    crops = []
    for idx in range(VIDEO_CROPS):
        y, x = y_mid, x_mid
        if h > w:
            y = (0, y_mid, h - size)[idx]
        else:
            x = (0, x_mid, w - size)[idx]
        crops.append(video[..., y : y + size, x : x + size])
    return crops


def load_video(path: str | os.PathLike) -> Tensor:
    """Video file -> ``[15, 3, 2, 224, 224]`` float32: 5 clips of 2 s, 2 frames each,
    short side 224, CLIP norm, 3 spatial crops per clip (index = clip * 3 + crop)."""
    import decord

    path = _require_file(path)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        num_frames, fps = len(reader), float(reader.get_avg_fps())
    except Exception as err:  # decord raises its own DECORDError and plain RuntimeErrors
        raise MediaError(path, f"not a readable video ({err}); re-encode it (e.g. H.264 MP4) or drop the row") from err
    if num_frames == 0 or not fps > 0:
        raise MediaError(path, f"video has {num_frames} frames at {fps} fps; nothing to encode")
    duration = num_frames / fps
    if num_frames > LIMITS.max_video_frames or duration > LIMITS.max_video_seconds:
        raise MediaError(path, f"video has {num_frames} frames, {duration:.0f} s, over data.media_limits (max_video_frames="
                               f"{LIMITS.max_video_frames}, max_video_seconds={LIMITS.max_video_seconds:g}): not decoded")

    # pytorchvideo's decord clip: frames ceil(fps*start) .. ceil(fps*end)-1, of which
    # UniformTemporalSubsample(2) keeps the first and the last.
    picks = []
    for start in _constant_clip_starts(duration, VIDEO_CLIP_SECONDS, VIDEO_CLIPS):
        first = math.ceil(fps * start)
        stop = min(math.ceil(fps * (start + VIDEO_CLIP_SECONDS)), num_frames)
        if stop <= first:
            raise MediaError(path, f"no frames between {float(start):.2f}s and the end of the video")
        count = stop - first
        picks.append([first + int(i) for i in torch.linspace(0, count - 1, VIDEO_FRAMES_PER_CLIP).long()])
    wanted = sorted({i for clip in picks for i in clip})
    try:
        # decord tells no frame size before decoding: decode one frame and check it before the
        # batch, which holds len(wanted) frames of that size.
        height, width = reader[wanted[0]].shape[:2]
    except Exception as err:
        raise MediaError(path, f"decoding frame {wanted[0]} failed ({err}); re-encode the video or drop the row") from err
    if width * height > LIMITS.max_video_pixels:
        raise MediaError(path, f"video frames are {width} × {height} pixels, over data.media_limits.max_video_pixels="
                               f"{LIMITS.max_video_pixels}: the other {len(wanted) - 1} frames were not decoded")
    try:
        batch = reader.get_batch(wanted)  # [N, H, W, 3] uint8
        # decord's output type follows a process-wide bridge that other code (pytorchvideo)
        # may switch to torch; accept either.
        frames = torch.from_numpy(batch.asnumpy()) if hasattr(batch, "asnumpy") else torch.as_tensor(batch)
    except Exception as err:
        raise MediaError(path, f"decoding frames {wanted} failed ({err}); re-encode the video or drop the row") from err
    finally:
        del reader
    row = {idx: n for n, idx in enumerate(wanted)}

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    out = []
    for clip in picks:
        video = frames[[row[i] for i in clip]].to(torch.float32).permute(3, 0, 1, 2) / 255.0  # [C,T,H,W]
        video = (_short_side_scale(video, IMAGE_SIZE) - mean) / std
        out.extend(_three_crops(video, IMAGE_SIZE))
    return torch.stack(out).contiguous()

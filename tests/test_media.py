"""Media preprocessing: every bundled file decodes; the reference pipeline's rules hold."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from toollmm import media
from toollmm.media import MediaError, load_audio, load_image, load_video

from conftest import DATA  # noqa: E402
PAIRS = DATA / "t2x_pairs"

IMAGES = [DATA / "assets" / "bird_image.jpg", *sorted((PAIRS / "cc3m" / "images").glob("*.jpg"))]
AUDIOS = [DATA / "assets" / "bird_audio.wav", DATA / "assets" / "test.wav", *sorted((PAIRS / "audiocap" / "audios").glob("*.wav"))]
VIDEOS = [DATA / "assets" / "test.mp4", *sorted((PAIRS / "webvid" / "videos").glob("*.mp4"))]

PAD_VALUE = (0.0 - media.AUDIO_MEAN) / media.AUDIO_STD  # a zero-padded fbank frame after normalisation


def _ids(paths):
    return [p.name for p in paths]


def test_bundled_media_present():
    # Guards the parametrised tests below against silently testing nothing.
    assert len(IMAGES) >= 2 and len(AUDIOS) >= 3 and len(VIDEOS) >= 2
    assert all(p.is_file() for p in IMAGES + AUDIOS + VIDEOS)


@pytest.mark.parametrize("path", IMAGES, ids=_ids(IMAGES))
def test_bundled_images_decode(path):
    x = load_image(path)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # CLIP-normalised pixels lie in [(0-mean)/std, (1-mean)/std] per channel.
    lo = (0 - torch.tensor(media.CLIP_MEAN)) / torch.tensor(media.CLIP_STD)
    hi = (1 - torch.tensor(media.CLIP_MEAN)) / torch.tensor(media.CLIP_STD)
    flat = x.flatten(1)
    assert (flat.min(1).values >= lo - 1e-5).all() and (flat.max(1).values <= hi + 1e-5).all()


@pytest.mark.parametrize("path", AUDIOS, ids=_ids(AUDIOS))
def test_bundled_audio_decodes(path):
    x = load_audio(path)
    assert x.shape == (3, 1, 128, 204) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # A 2 s clip at 16 kHz gives 198 kaldi frames (25 ms window, 10 ms hop): the last 6
    # columns are zero padding.
    torch.testing.assert_close(x[..., 198:], torch.full_like(x[..., 198:], PAD_VALUE))
    assert not torch.allclose(x[..., 197], torch.full_like(x[..., 197], PAD_VALUE))


@pytest.mark.parametrize("path", VIDEOS, ids=_ids(VIDEOS))
def test_bundled_videos_decode(path):
    x = load_video(path)
    assert x.shape == (15, 3, 2, 224, 224) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_video_crops_are_left_centre_right_per_clip():
    path = DATA / "assets" / "test.mp4"  # 576x320 landscape, 24 frames at 8 fps
    x = load_video(path)
    width = math.floor(576 / 320 * 224)  # short side scaled to 224 -> 403 wide
    mid, right = math.ceil((width - 224) / 2), width - 224
    for clip in range(5):
        left_c, centre_c, right_c = x[3 * clip], x[3 * clip + 1], x[3 * clip + 2]
        # Overlapping columns of neighbouring crops of the same clip are the same pixels.
        torch.testing.assert_close(centre_c[..., : 224 - mid], left_c[..., mid:])
        torch.testing.assert_close(right_c[..., : 224 - (right - mid)], centre_c[..., right - mid :])
    # Clips are 2 s windows starting every 0.2 s of a 3 s video: they differ.
    assert not torch.equal(x[0], x[3])


def test_constant_clip_sampler_matches_reference_rule():
    starts = media._constant_clip_starts(10.0, 2, 3)
    assert starts == [0, Fraction(8, 3), Fraction(16, 3)]
    assert media._constant_clip_starts(1.5, 2, 5) == [0] * 5  # shorter than a clip: all at 0


def _write_wav(path, data, sr, subtype="PCM_16"):
    sf.write(str(path), data, sr, subtype=subtype)
    return path


def test_short_audio_is_padded_and_resampled(tmp_path):
    sr = 48_000
    t = np.arange(sr) / sr  # 1 s
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    x = load_audio(_write_wav(tmp_path / "short.wav", tone, sr))
    assert x.shape == (3, 1, 128, 204)
    # 1 s at 16 kHz -> 98 frames; the rest is padding.
    torch.testing.assert_close(x[..., 98:], torch.full_like(x[..., 98:], PAD_VALUE))
    assert not torch.allclose(x[..., :98], torch.full_like(x[..., :98], PAD_VALUE))
    # All three clips cover the same (whole) second.
    torch.testing.assert_close(x[0], x[2], atol=1e-3, rtol=0)


def test_stereo_uses_the_first_channel_as_the_reference(tmp_path):
    sr = 16_000
    rng = np.random.default_rng(0)
    left = (0.3 * rng.standard_normal(6 * sr)).astype(np.float32)  # broadband: every mel bin has energy
    # A Nyquist-rate square wave: its mean over any clip is at most 0.1/32000, so the
    # all-channel mean the reference subtracts stays negligible next to the left channel.
    right = (0.1 * (-1.0) ** np.arange(6 * sr)).astype(np.float32)
    stereo = load_audio(_write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), sr, "FLOAT"))
    only_left = load_audio(_write_wav(tmp_path / "left.wav", left, sr, "FLOAT"))
    only_right = load_audio(_write_wav(tmp_path / "right.wav", right, sr, "FLOAT"))
    torch.testing.assert_close(stereo, only_left, atol=5e-3, rtol=0)  # lowest mel bin feels the DC shift
    assert (stereo - only_right).abs().max() > 1.0


def test_image_modes_become_rgb(tmp_path):
    for mode in ("L", "RGBA", "P"):
        path = tmp_path / f"img_{mode}.png"
        Image.new(mode, (300, 200)).save(path)
        assert load_image(path).shape == (3, 224, 224)


@pytest.mark.parametrize("loader", [load_image, load_audio, load_video])
def test_missing_file_raises_media_error(tmp_path, loader):
    path = tmp_path / "nowhere" / "file.bin"
    with pytest.raises(MediaError) as err:
        loader(path)
    assert err.value.path == path
    assert str(path) in str(err.value) and "does not exist" in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(("loader", "name"), [(load_image, "x.jpg"), (load_audio, "x.wav"), (load_video, "x.mp4")])
def test_undecodable_file_raises_media_error(tmp_path, loader, name):
    path = tmp_path / name
    path.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(MediaError, match="not a readable") as err:
        loader(path)
    assert str(path) in str(err.value)


def test_directory_is_not_a_media_file(tmp_path):
    with pytest.raises(MediaError, match="is a directory"):
        load_image(tmp_path)


def test_too_short_audio_raises(tmp_path):
    path = _write_wav(tmp_path / "blip.wav", np.zeros(100, dtype=np.float32), 16_000)
    with pytest.raises(MediaError, match="shorter than one 25 ms"):
        load_audio(path)

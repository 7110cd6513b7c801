"""Parity with Meta's reference ImageBind (model and preprocessing).

Needs the reference package, which is not a runtime dependency; without it these tests skip.
Install it without its (old, pinned) dependency tree:

    pip install --no-deps imagebind-unofficial==0.1.1 pytorchvideo==0.1.5 timm ftfy iopath portalocker wcwidth

Three shims make that 2023 code run on this torch stack; none touches what is compared:
``torchvision.transforms.functional_tensor`` (renamed in torchvision 0.17, imported by
pytorchvideo 0.1.5) is aliased; ``torchaudio.load`` (needs torchcodec, absent here) reads
the WAV with soundfile, which yields the same float32 samples; and pytorchvideo 0.1.5's
``EncodedVideo.from_path`` is given the ``sample_rate`` keyword the reference passes
(the git pytorchvideo the reference pins accepts it; decord ignores it for video).
"""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch

try:  # must precede the reference import
    import torchvision.transforms._functional_tensor as _ft

    sys.modules.setdefault("torchvision.transforms.functional_tensor", _ft)
except ImportError:
    pass

if os.environ.get("TOOLLMM_REQUIRE_REFERENCE"):
    # scripts/test.sh installs the reference: there a failed import must fail, not skip.
    import imagebind.data as ref_data
    import imagebind.models.imagebind_model as ref_model
else:
    pytest.importorskip(
        "imagebind",
        reason="reference ImageBind not installed (pip install --no-deps -r requirements-reference.txt)",
    )
    ref_data = pytest.importorskip("imagebind.data")
    ref_model = pytest.importorskip("imagebind.models.imagebind_model")

from toollmm import media  # noqa: E402
from toollmm.model.imagebind import ImageBindConfig, ImageBindEncoder  # noqa: E402

from conftest import DATA  # noqa: E402
PAIRS = DATA / "t2x_pairs"
IMAGES = [DATA / "assets" / "bird_image.jpg", *sorted((PAIRS / "cc3m" / "images").glob("*.jpg"))[:3]]
AUDIOS = [DATA / "assets" / "bird_audio.wav", DATA / "assets" / "test.wav", *sorted((PAIRS / "audiocap" / "audios").glob("*.wav"))]
VIDEOS = [DATA / "assets" / "test.mp4", sorted((PAIRS / "webvid" / "videos").glob("*.mp4"))[0]]

TOL = 1e-5


@pytest.fixture()
def reference_io(monkeypatch):
    import soundfile as sf

    def load(path, *args, **kwargs):
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return torch.from_numpy(data.T.copy()), sr

    monkeypatch.setattr(ref_data.torchaudio, "load", load)
    encoded = ref_data.EncodedVideo
    params = inspect.signature(encoded.from_path).parameters
    if "sample_rate" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        original = encoded.from_path.__func__

        def from_path(cls, file_path, decode_audio=True, decoder="pyav", **_ignored):
            return original(cls, file_path, decode_audio, decoder)

        monkeypatch.setattr(encoded, "from_path", classmethod(from_path))
    return ref_data


def _reference_tiny():
    c = ImageBindConfig.tiny()
    small = dict(embed_dim=32, num_blocks=1, num_heads=2)  # the other modalities only cost time
    others = {f"{m}_{k}": v for m in ("text", "depth", "thermal", "imu") for k, v in small.items()}
    return ref_model.ImageBindModel(
        vision_embed_dim=c.vision_embed_dim,
        vision_num_blocks=c.vision_num_blocks,
        vision_num_heads=c.vision_num_heads,
        audio_embed_dim=c.audio_embed_dim,
        audio_num_blocks=c.audio_num_blocks,
        audio_num_heads=c.audio_num_heads,
        out_embed_dim=c.out_embed_dim,
        **others,
    )


@pytest.fixture(scope="module")
def pair():
    """(reference, ours) with identical, non-trivial weights, in eval mode."""
    torch.manual_seed(0)
    ref = _reference_tiny().eval()
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.ndim:
                t.add_(0.05 * torch.randn_like(t))
    ours = ImageBindEncoder(ImageBindConfig.tiny()).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()}, strict=True)
    return ref, ours


def test_huge_layout_equals_reference(monkeypatch):
    linspace = torch.linspace
    # The reference computes drop-path rates with .item(), impossible on meta tensors.
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        ref = ref_model.imagebind_huge(pretrained=False)
    monkeypatch.undo()
    with torch.device("meta"):
        ours = ImageBindEncoder(ImageBindConfig.huge())
    want = [(k, tuple(v.shape)) for k, v in ref.state_dict().items() if k.split(".")[1] in ("vision", "audio")]
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == want


def test_embeddings_match_reference(pair):
    ref, ours = pair
    g = torch.Generator().manual_seed(1)
    cases = [
        ("vision", torch.randn(2, 3, 224, 224, generator=g)),
        ("vision", torch.randn(2, 3, 3, 2, 224, 224, generator=g)),
        ("audio", torch.randn(2, 3, 1, 128, 204, generator=g)),
    ]
    with torch.no_grad():
        for branch, x in cases:
            got, want = ours(branch, x), ref({branch: x})[branch]
            assert got.shape == want.shape == (2, 1024)
            assert (got - want).abs().max().item() <= TOL, (branch, tuple(x.shape))


@pytest.mark.parametrize("path", IMAGES, ids=[p.name for p in IMAGES])
def test_image_preprocessing_matches_reference(reference_io, path):
    want = reference_io.load_and_transform_vision_data([str(path)], "cpu")[0]
    assert (media.load_image(path) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("path", AUDIOS, ids=[p.name for p in AUDIOS])
def test_audio_preprocessing_matches_reference(reference_io, path):
    want = reference_io.load_and_transform_audio_data([str(path)], "cpu")[0]
    assert (media.load_audio(path) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("path", VIDEOS, ids=[p.name for p in VIDEOS])
def test_video_preprocessing_matches_reference(reference_io, path):
    want = reference_io.load_and_transform_video_data([str(path)], "cpu")[0]
    assert (media.load_video(path) - want).abs().max().item() <= TOL


def test_end_to_end_on_bundled_media(reference_io, pair):
    ref, ours = pair
    inputs = {
        "vision": media.load_image(IMAGES[0]).unsqueeze(0),
        "audio": media.load_audio(AUDIOS[0]).unsqueeze(0),
    }
    video = media.load_video(VIDEOS[0]).unsqueeze(0)
    with torch.no_grad():
        want = ref(inputs)
        for branch, x in inputs.items():
            assert (ours(branch, x) - want[branch]).abs().max().item() <= TOL
        got_v, want_v = ours("vision", video), ref({"vision": video})["vision"]
        assert (got_v - want_v).abs().max().item() <= TOL

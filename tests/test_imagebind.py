"""ImageBindEncoder: official checkpoint layout, checkpoint IO and forward semantics."""

from __future__ import annotations

import json

import pytest
import torch

from toollmm.model.imagebind import ImageBindConfig, ImageBindEncoder, load_imagebind, save_imagebind

# Per-block parameters of the official trunks: (suffix, shape as a function of width D).
_BLOCK = {
    "attn.in_proj_weight": lambda d: (3 * d, d),
    "attn.in_proj_bias": lambda d: (3 * d,),
    "attn.out_proj.weight": lambda d: (d, d),
    "attn.out_proj.bias": lambda d: (d,),
    "norm_1.weight": lambda d: (d,),
    "norm_1.bias": lambda d: (d,),
    "mlp.fc1.weight": lambda d: (4 * d, d),
    "mlp.fc1.bias": lambda d: (4 * d,),
    "mlp.fc2.weight": lambda d: (d, 4 * d),
    "mlp.fc2.bias": lambda d: (d,),
    "norm_2.weight": lambda d: (d,),
    "norm_2.bias": lambda d: (d,),
}
_AUDIO_BLOCK_EXTRA = {"attn.bias_k": lambda d: (1, 1, d), "attn.bias_v": lambda d: (1, 1, d)}

# imagebind_huge.pth, vision and audio entries (names and shapes as in the official file).
HUGE_NON_BLOCK = {
    "modality_preprocessors.vision.cls_token": (1, 1, 1280),
    "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
    "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
    "modality_trunks.vision.pre_transformer_layer.0.weight": (1280,),
    "modality_trunks.vision.pre_transformer_layer.0.bias": (1280,),
    "modality_heads.vision.0.weight": (1280,),
    "modality_heads.vision.0.bias": (1280,),
    "modality_heads.vision.2.weight": (1024, 1280),
    "modality_preprocessors.audio.cls_token": (1, 1, 768),
    "modality_preprocessors.audio.rgbt_stem.proj.weight": (768, 1, 16, 16),
    "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": (768,),
    "modality_preprocessors.audio.rgbt_stem.norm_layer.bias": (768,),
    "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, 768),
    "modality_heads.audio.0.weight": (768,),
    "modality_heads.audio.0.bias": (768,),
    "modality_heads.audio.2.weight": (1024, 768),
    "modality_postprocessors.audio.1.log_logit_scale": (),
}


def expected_huge_table() -> dict[str, tuple[int, ...]]:
    table = dict(HUGE_NON_BLOCK)
    for branch, dim, depth, extra in (("vision", 1280, 32, {}), ("audio", 768, 12, _AUDIO_BLOCK_EXTRA)):
        for i in range(depth):
            for suffix, shape in {**_BLOCK, **extra}.items():
                table[f"modality_trunks.{branch}.blocks.{i}.{suffix}"] = shape(dim)
    return table


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def huge_meta() -> ImageBindEncoder:
    with torch.device("meta"):
        return ImageBindEncoder(ImageBindConfig.huge())


@pytest.fixture()
def tiny() -> ImageBindEncoder:
    torch.manual_seed(0)
    model = ImageBindEncoder(ImageBindConfig.tiny()).eval()
    # Fresh LayerNorms are identity and biases zero; perturb everything so that a
    # mis-loaded tensor changes the output.
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.ndim:
                t.add_(0.05 * torch.randn_like(t))
    return model


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(batch, 3, 224, 224, generator=g),
        "video": torch.randn(batch, 3, 3, 2, 224, 224, generator=g),
        "audio": torch.randn(batch, 3, 1, 128, 204, generator=g),
    }


# --------------------------------------------------------------------------- layout


def test_huge_state_dict_matches_official_table(huge_meta):
    shapes = _shapes(huge_meta)
    assert all(t.is_meta for t in huge_meta.state_dict().values())
    expected = expected_huge_table()
    assert set(shapes) == set(expected)
    assert shapes == expected
    vision = [k for k in shapes if k.split(".")[1] == "vision"]
    audio = [k for k in shapes if k.split(".")[1] == "audio"]
    assert (len(vision), len(audio), len(shapes)) == (392, 177, 569)
    # The audio trunk has no pre-norm, the vision trunk no bias_k/v, vision no post params.
    assert not any("audio.pre_transformer_layer" in k for k in shapes)
    assert not any("vision" in k and "bias_k" in k for k in shapes)
    assert not any(k.startswith("modality_postprocessors.vision") for k in shapes)


def test_huge_logit_scale_is_a_buffer_not_a_parameter(huge_meta):
    params = dict(huge_meta.named_parameters())
    buffers = dict(huge_meta.named_buffers())
    assert "modality_postprocessors.audio.1.log_logit_scale" in buffers
    assert "modality_postprocessors.audio.1.log_logit_scale" not in params
    assert len(params) + len(buffers) == 569


def test_tiny_has_huge_names_up_to_its_depth(huge_meta):
    with torch.device("meta"):
        tiny_meta = ImageBindEncoder(ImageBindConfig.tiny())
    depth = ImageBindConfig.tiny().vision_num_blocks
    assert depth == ImageBindConfig.tiny().audio_num_blocks == 2

    def shallow(key: str) -> bool:
        parts = key.split(".")
        return not ("blocks" in parts and int(parts[parts.index("blocks") + 1]) >= depth)

    assert list(tiny_meta.state_dict()) == [k for k in huge_meta.state_dict() if shallow(k)]
    assert tiny_meta.state_dict()["modality_heads.vision.2.weight"].shape == (1024, 32)


def test_branch_subset_builds_only_that_branch():
    with torch.device("meta"):
        vision_only = ImageBindEncoder(ImageBindConfig.tiny(), branches=("vision",))
    assert {k.split(".")[1] for k in vision_only.state_dict()} == {"vision"}
    with pytest.raises(ValueError, match="branch 'audio' is not in this encoder"):
        vision_only("audio", torch.zeros(1, 1, 128, 204, device="meta"))
    with pytest.raises(ValueError, match="subset"):
        ImageBindEncoder(ImageBindConfig.tiny(), branches=("text",))


def test_config_dict_roundtrip_is_json_safe():
    for config in (ImageBindConfig.huge(), ImageBindConfig.tiny()):
        again = ImageBindConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
        assert again.vision_kernel == (2, 14, 14)
    with pytest.raises(ValueError, match="unknown ImageBindConfig field"):
        ImageBindConfig.from_dict({"vision_width": 3})
    with pytest.raises(ValueError, match="divisible"):
        ImageBindConfig(vision_embed_dim=30, vision_num_heads=4)


# --------------------------------------------------------------------------- checkpoint IO


def test_save_load_roundtrip_identical_outputs(tiny, tmp_path):
    path = tmp_path / "ckpt" / "imagebind_tiny.pth"
    save_imagebind(tiny, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == list(tiny.state_dict())  # flat official layout
    loaded = load_imagebind(path, ImageBindConfig.tiny()).eval()
    x = _inputs()
    with torch.no_grad():
        for branch, key in (("vision", "image"), ("vision", "video"), ("audio", "audio")):
            assert torch.equal(loaded(branch, x[key]), tiny(branch, x[key]))


def _write(state: dict, tmp_path, name="bad.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_missing_key_is_named(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["modality_trunks.audio.blocks.1.attn.bias_k"]
    path = _write(state, tmp_path)
    with pytest.raises(ValueError) as err:
        load_imagebind(path, ImageBindConfig.tiny())
    msg = str(err.value)
    assert str(path) in msg and "1 missing" in msg and "modality_trunks.audio.blocks.1.attn.bias_k" in msg
    assert "imagebind_huge.pth" in msg


@pytest.mark.parametrize(
    "extra", ["modality_trunks.vision.blocks.2.norm_1.weight", "modality_heads.audio.1.weight", "model.logit_scale"]
)
def test_unexpected_key_is_named(tiny, tmp_path, extra):
    state = {**tiny.state_dict(), extra: torch.ones(32)}
    with pytest.raises(ValueError, match=r"1 unexpected: " + extra.replace(".", r"\.")):
        load_imagebind(_write(state, tmp_path), ImageBindConfig.tiny())


def test_wrong_shape_is_named(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["modality_preprocessors.vision.pos_embedding_helper.pos_embed"] = torch.zeros(1, 50, 32)
    with pytest.raises(ValueError) as err:
        load_imagebind(_write(state, tmp_path), ImageBindConfig.tiny())
    assert "modality_preprocessors.vision.pos_embedding_helper.pos_embed: file (1, 50, 32) vs model (1, 257, 32)" in str(err.value)


def test_huge_config_on_tiny_file_explains(tiny, tmp_path):
    path = tmp_path / "tiny.pth"
    save_imagebind(tiny, path)
    with pytest.raises(ValueError, match="does not fit the huge config") as err:
        load_imagebind(path, ImageBindConfig.huge())
    assert "wrong shape" in str(err.value) and "model.imagebind_size" in str(err.value)


def test_other_official_modalities_are_dropped(tiny, tmp_path):
    state = {
        "modality_preprocessors.text.token_embedding.weight": torch.zeros(49408, 8),
        "modality_trunks.text.blocks.0.attn.in_proj_weight": torch.zeros(24, 8),
        "modality_heads.depth.2.weight": torch.zeros(1024, 8),
        "modality_postprocessors.text.1.log_logit_scale": torch.tensor(2.0),
        "modality_trunks.imu.blocks.0.norm_1.weight": torch.zeros(8),
        "modality_preprocessors.thermal.cls_token": torch.zeros(1, 1, 8),
        **tiny.state_dict(),
    }
    loaded = load_imagebind(_write(state, tmp_path, "full.pth"), ImageBindConfig.tiny()).eval()
    x = _inputs(1)["image"]
    with torch.no_grad():
        assert torch.equal(loaded("vision", x), tiny("vision", x))
    # A vision-only load drops the audio keys the same way.
    vision_only = load_imagebind(tmp_path / "full.pth", ImageBindConfig.tiny(), branches=("vision",))
    assert {k.split(".")[1] for k in vision_only.state_dict()} == {"vision"}


def test_unreadable_files_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_imagebind(tmp_path / "nope.pth", ImageBindConfig.tiny())
    with pytest.raises(ValueError, match="not a flat state dict"):
        load_imagebind(_write([torch.zeros(1)], tmp_path), ImageBindConfig.tiny())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read ImageBind checkpoint"):
        load_imagebind(junk, ImageBindConfig.tiny())


# --------------------------------------------------------------------------- forward


def test_output_shapes_and_norms(tiny):
    x = _inputs()
    with torch.no_grad():
        image = tiny("vision", x["image"])
        audio_one_clip = tiny("audio", x["audio"][:, 0])
        audio = tiny("audio", x["audio"])
    assert image.shape == audio.shape == (2, 1024)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(audio_one_clip.norm(dim=-1), torch.full((2,), 20.0))
    # Averaging over clips happens after normalisation and scaling, so it shrinks the norm.
    assert (audio.norm(dim=-1) < 20.0).all()


def test_clip_axis_averages_per_clip_embeddings(tiny):
    x = _inputs()
    with torch.no_grad():
        for branch, key in (("vision", "video"), ("audio", "audio")):
            clips = x[key]
            per_clip = torch.stack([tiny(branch, clips[:, s : s + 1]) for s in range(clips.shape[1])], dim=1)
            torch.testing.assert_close(tiny(branch, clips), per_clip.mean(dim=1), rtol=1e-5, atol=1e-6)
        # The same clip's embeddings differ per batch element (no mixing across the batch).
        video = x["video"]
        torch.testing.assert_close(tiny("vision", video)[1:], tiny("vision", video[1:]), rtol=1e-5, atol=1e-6)


def test_image_equals_its_two_frame_repeat(tiny):
    image = _inputs(1)["image"]
    as_video = image.unsqueeze(2).repeat(1, 1, 2, 1, 1).unsqueeze(1)  # [1, S=1, 3, 2, H, W]
    with torch.no_grad():
        torch.testing.assert_close(tiny("vision", image), tiny("vision", as_video), rtol=1e-5, atol=1e-6)


def test_drop_path_only_in_training(tiny):
    x = _inputs(8)["audio"][:, 0]
    with torch.no_grad():
        first, second = tiny("audio", x), tiny("audio", x)
        assert torch.equal(first, second)
        tiny.train()
        torch.manual_seed(3)
        trained = [tiny("audio", x) for _ in range(4)]
        # Vision has no stochastic depth, so training mode does not change it.
        image = _inputs(1)["image"]
        vision_train = tiny("vision", image)
        tiny.eval()
        vision_eval = tiny("vision", image)
    assert any(not torch.allclose(t, first) for t in trained)
    torch.testing.assert_close(vision_train, vision_eval)


def test_bad_inputs_are_rejected(tiny):
    with pytest.raises(ValueError, match="audio input must be"):
        tiny("audio", torch.zeros(1, 3, 128, 204))
    with pytest.raises(ValueError, match="vision input must be"):
        tiny("vision", torch.zeros(1, 3, 2, 224, 224))  # clip axis missing: ambiguous
    with pytest.raises(ValueError, match="position embedding"):
        tiny("vision", torch.zeros(1, 3, 112, 112))
    with pytest.raises(ValueError, match="unknown|not in this encoder"):
        tiny("text", torch.zeros(1, 77))


def test_bfloat16_inputs_follow_weight_dtype(tiny):
    model = tiny.to(torch.bfloat16)
    with torch.no_grad():
        out = model("vision", _inputs(1)["image"])  # float32 input, bf16 weights
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1024)

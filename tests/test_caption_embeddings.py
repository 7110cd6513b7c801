"""Caption embeddings (stage-2 targets): the encoders against diffusers' own pipelines, the
store's refusals, and process_embeddings.py end to end on the bundled caption files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import ROOT, DATA
from toollmm.caption_embeddings import (
    CaptionEmbeddingMismatch,
    CaptionEmbeddingMissing,
    CaptionEmbeddingStore,
    CaptionEncoder,
    DecoderFolderError,
)
from toollmm.cli import process_embeddings
from toollmm.tiny_decoders import DIFFUSION_DIR, build_tiny_decoders

PAIRS = DATA / "t2x_pairs"
SHAPES = {"tiny_sd": (77, 768), "tiny_zeroscope": (77, 1024), "tiny_audioldm": (512,)}
MODALITY = {"tiny_sd": "image", "tiny_zeroscope": "video", "tiny_audioldm": "audio"}
CAPTIONS = [
    "A dog runs on the beach.",
    "rugby player during the match .",
    "Café au lait, isn't it?",
    # Longer than 77 character tokens: the CLIP pipelines truncate it.
    "A doctor puts an infusion system into action in close-up on the black background, slow motion.",
    "x",
]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict:
    return build_tiny_decoders(tmp_path_factory.mktemp("decoders"))


@pytest.fixture(scope="module")
def encoders(decoders) -> dict:
    return {name: CaptionEncoder(folder, MODALITY[name]) for name, folder in decoders.items()}


# --------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("name", SHAPES)
def test_shapes_dtype_and_identity(encoders, name):
    encoder = encoders[name]
    out = encoder.encode(CAPTIONS)
    assert encoder.out_shape == SHAPES[name]
    assert out.shape == (len(CAPTIONS), *SHAPES[name]) and out.dtype == torch.float32
    assert not torch.equal(out[0], out[1])  # the caption matters
    prefix = "clap-512-" if name == "tiny_audioldm" else f"clip-77x{SHAPES[name][1]}-"
    assert encoder.identity.startswith(prefix) and encoder.identity.endswith("-p1")


def test_audioldm_embeddings_are_unit_norm(encoders):
    norms = encoders["tiny_audioldm"].encode(CAPTIONS).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(len(CAPTIONS)))


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)


def _tiny_unet(unet_class, blocks: str, cross_attention_dim: int, **extra):
    return unet_class(
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8, sample_size=8, attention_head_dim=2,
        down_block_types=(f"CrossAttnDownBlock{blocks}", f"DownBlock{blocks}"),
        up_block_types=(f"UpBlock{blocks}", f"CrossAttnUpBlock{blocks}"), cross_attention_dim=cross_attention_dim, **extra,
    )


def diffusers_reference(name: str, folder, captions: list[str]) -> torch.Tensor:
    """The positive-prompt embeddings of the real diffusers pipeline, assembled from tiny parts."""
    pytest.importorskip("diffusers", reason="the parity tests need diffusers (the [decoders] extra)")
    from diffusers import (AudioLDMPipeline, DDIMScheduler, StableDiffusionPipeline, TextToVideoSDPipeline,
                           UNet2DConditionModel, UNet3DConditionModel)
    from transformers import (ClapTextModelWithProjection, CLIPTextModel, CLIPTokenizer, RobertaTokenizerFast,
                              SpeechT5HifiGan, SpeechT5HifiGanConfig)

    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    if name == "tiny_audioldm":
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=8, upsample_initial_channel=8, upsample_rates=[2], upsample_kernel_sizes=[4],
            resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1]]))
        unet = _tiny_unet(UNet2DConditionModel, "2D", 8, class_embed_type="simple_projection",
                          projection_class_embeddings_input_dim=512, class_embeddings_concat=True)
        pipe = AudioLDMPipeline(
            vae=_tiny_vae(), unet=unet, scheduler=scheduler, vocoder=vocoder,
            text_encoder=ClapTextModelWithProjection.from_pretrained(folder / "text_encoder", dtype=torch.float32),
            tokenizer=RobertaTokenizerFast.from_pretrained(folder / "tokenizer"))  # AudioLDM's model_index names the fast one
        return pipe._encode_prompt(captions, "cpu", 1, do_classifier_free_guidance=False)
    text = dict(text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32),
                tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    if name == "tiny_sd":
        pipe = StableDiffusionPipeline(vae=_tiny_vae(), unet=_tiny_unet(UNet2DConditionModel, "2D", 768), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False, **text)
    else:
        pipe = TextToVideoSDPipeline(vae=_tiny_vae(), unet=_tiny_unet(UNet3DConditionModel, "3D", 1024), scheduler=scheduler, **text)
    positive, negative = pipe.encode_prompt(captions, "cpu", 1, do_classifier_free_guidance=False, clip_skip=None)
    assert negative is None
    return positive


@pytest.mark.parametrize("name", SHAPES)
def test_parity_with_diffusers_pipelines(decoders, encoders, name):
    reference = diffusers_reference(name, decoders[name], CAPTIONS)
    assert torch.equal(encoders[name].encode(CAPTIONS), reference.float())


@pytest.mark.parametrize("name", ["tiny_sd", "tiny_audioldm"])
def test_batching_equals_one_at_a_time(encoders, name):
    encoder = encoders[name]
    alone = torch.cat([encoder.encode([caption]) for caption in CAPTIONS])
    torch.testing.assert_close(encoder.encode(CAPTIONS, batch_size=2), alone, rtol=1e-5, atol=1e-5)


def test_identity_follows_weights_and_tokenizer_not_location(decoders, encoders, tmp_path):
    copy = shutil.copytree(decoders["tiny_sd"], tmp_path / "copy")
    assert CaptionEncoder(copy, "image").identity == encoders["tiny_sd"].identity
    weights = copy / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = CaptionEncoder(copy, "image").identity
    assert changed != encoders["tiny_sd"].identity
    config = copy / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"model_max_length": 77', '"model_max_length": 76'))
    retokenized = CaptionEncoder(copy, "image")
    assert retokenized.identity not in (changed, encoders["tiny_sd"].identity) and retokenized.out_shape == (76, 768)


def test_unsupported_or_missing_decoder_is_named(decoders, tmp_path):
    copy = shutil.copytree(decoders["tiny_sd"], tmp_path / "t5")
    config = copy / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "architectures": ["T5EncoderModel"]}))
    with pytest.raises(DecoderFolderError, match="T5EncoderModel") as err:
        CaptionEncoder(copy, "image")
    assert str(copy) in str(err.value)
    with pytest.raises(DecoderFolderError, match="text_encoder/config.json"):
        CaptionEncoder(tmp_path / "nowhere", "image")


# --------------------------------------------------------------------------- store


def store_for(root, shape=(77, 768), identity="clip-a"):
    return CaptionEmbeddingStore.for_writing(root, identity=identity, shape=shape, modality="image", decoder="/ckpt/sd")


def test_store_round_trip_is_exact_and_leaves_no_temporary_files(tmp_path):
    store = store_for(tmp_path / "emb")
    arrays = {f"{i:03d}.jpg.npy": np.random.default_rng(i).standard_normal((77, 768)).astype(np.float32) for i in range(3)}
    for name, array in arrays.items():
        store.save(name, torch.from_numpy(array))
    reader = CaptionEmbeddingStore.for_reading(tmp_path / "emb", shape=(77, 768), identity="clip-a")
    assert reader.names() == sorted(arrays)
    for name, array in arrays.items():
        assert np.array_equal(reader.load(name), array) and reader.load(name).dtype == np.float32
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == sorted([*arrays, "manifest.json"])


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    store = store_for(tmp_path / "emb")

    def dies_midway(file, array, allow_pickle):
        file.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        store.save("a.jpg.npy", np.zeros((77, 768), np.float32))
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["manifest.json"]
    assert "a.jpg.npy" not in store


def test_store_refuses_another_shape_or_encoder(tmp_path):
    root = tmp_path / "emb"
    store_for(root)
    with pytest.raises(CaptionEmbeddingMismatch) as err:
        CaptionEmbeddingStore.for_reading(root, shape=(77, 1024), expected_by="model.outputs.video")
    message = str(err.value)
    for part in (str(root), "77×768", "77×1024", "model.outputs.video", "process_embeddings.py", "another embeddings_dir"):
        assert part in message
    with pytest.raises(CaptionEmbeddingMismatch, match="clip-a.*clip-b"):
        CaptionEmbeddingStore.for_reading(root, shape=(77, 768), identity="clip-b")
    with pytest.raises(CaptionEmbeddingMismatch, match="77×768.*77×1024"):
        store_for(root, shape=(77, 1024))
    with pytest.raises(CaptionEmbeddingMismatch, match="clip-a.*clip-b"):
        store_for(root, identity="clip-b")
    store_for(root)  # the same encoder reopens it


def test_store_names_missing_and_malformed_files(tmp_path):
    with pytest.raises(CaptionEmbeddingMissing, match="process_embeddings.py"):
        CaptionEmbeddingStore.for_reading(tmp_path / "never", shape=(512,))
    store = store_for(tmp_path / "emb", shape=(512,))
    with pytest.raises(KeyError) as err:
        store.load("absent.wav.npy")
    assert str(tmp_path / "emb") in str(err.value) and "process_embeddings.py" in str(err.value)
    np.save(tmp_path / "emb" / "bad.wav.npy", np.zeros((1, 512), np.float32))
    with pytest.raises(CaptionEmbeddingMismatch, match="bad.wav.npy.*1×512"):
        store.load("bad.wav.npy")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    np.save(foreign / "x.jpg.npy", np.zeros((1, 77, 768), np.float32))
    with pytest.raises(CaptionEmbeddingMismatch, match="no manifest.json"):
        store_for(foreign)


# --------------------------------------------------------------------------- process_embeddings.py

BUNDLED = [("image", "tiny_sd", PAIRS / "cc3m" / "cc3m.json"), ("video", "tiny_zeroscope", PAIRS / "webvid" / "webvid.json"),
           ("audio", "tiny_audioldm", PAIRS / "audiocap" / "audiocap.json")]


def explicit(modality, decoder, captions, out, *extra):
    return process_embeddings.main(["--modality", modality, "--decoder", str(decoder), "--captions", str(captions),
                                    "--out", str(out), "--device", "cpu", "--quiet", "--batch-size", "4", *extra])


@pytest.mark.parametrize("modality,name,captions", BUNDLED)
def test_cli_explicit_mode_on_bundled_captions(decoders, encoders, tmp_path, modality, name, captions):
    rows = json.loads(captions.read_text())
    (summary,) = explicit(modality, decoders[name], captions, tmp_path / "emb")
    # webvid lists 3 videos that are missing: embeddings need the captions only.
    assert summary["written"] == summary["captions"] == len(rows) and summary["skipped_rows"] == 0
    store = CaptionEmbeddingStore.for_reading(tmp_path / "emb", shape=SHAPES[name], identity=encoders[name].identity)
    assert store.names() == sorted(f"{row[f'{modality}_name']}.npy" for row in rows)
    first = rows[0]
    expected = encoders[name].encode([first["caption"].strip()])[0].numpy()
    np.testing.assert_allclose(store.load(f"{first[f'{modality}_name']}.npy"), expected, rtol=1e-5, atol=1e-5)


def test_cli_resumes_overwrites_and_refuses_another_decoder(decoders, tmp_path, capsys):
    captions, out = PAIRS / "webvid" / "webvid.json", tmp_path / "emb"
    explicit("video", decoders["tiny_zeroscope"], captions, out)
    victim = out / "00169473.mp4.npy"
    victim.unlink()
    stamp = (out / "00138086.mp4.npy").stat().st_mtime_ns
    (summary,) = explicit("video", decoders["tiny_zeroscope"], captions, out)
    assert (summary["already_present"], summary["written"]) == (10, 1) and victim.is_file()
    assert (out / "00138086.mp4.npy").stat().st_mtime_ns == stamp
    (summary,) = explicit("video", decoders["tiny_zeroscope"], captions, out, "--overwrite")
    assert summary["written"] == 11
    with pytest.raises(SystemExit) as err:
        explicit("video", decoders["tiny_sd"], captions, out)
    assert "77×1024" in str(err.value) and "77×768" in str(err.value) and "another embeddings_dir" in str(err.value)


def test_cli_config_mode_all_modalities(decoders, tmp_path):
    entries = {m: dict(modality=m, media_root=str(c.parent), embeddings_dir=str(tmp_path / m)) for m, _, c in BUNDLED}
    caption_files = [{**entries[m], "path": str(c)} for m, _, c in BUNDLED]
    instruction_files = [{**entries[m], "path": str(c.with_name(f"{c.stem}_{kind}.json"))}
                         for m, _, c in BUNDLED for kind in ("generation", "comprehension")]
    # Only the decoder: each modality's expected shape is its default (77×768, 77×1024, 512).
    outputs = {m: {"decoder_path": str(decoders[n])} for m, n, _ in BUNDLED}
    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump({"model": {"outputs": outputs},
                                      "data": {"caption_files": caption_files, "instruction_files": instruction_files}}))
    summaries = process_embeddings.main(["--stage", "2", "--config", str(config), "--device", "cpu", "--quiet"])
    by_file = {s["captions_file"]: s for s in summaries}
    for modality, name, captions in BUNDLED:
        rows = json.loads(captions.read_text())
        assert by_file[str(captions)]["written"] == len(rows)
        generation = by_file[str(captions.with_name(f"{captions.stem}_generation.json"))]
        # The generation file names the same <media>.npy: nothing left to write.
        assert generation["written"] == 0 and generation["already_present"] == generation["names"] > 0
        assert by_file[str(captions.with_name(f"{captions.stem}_comprehension.json"))]["written"] == 0
        store = CaptionEmbeddingStore.for_reading(tmp_path / modality, shape=SHAPES[name])
        assert len(store.names()) == len(rows)
    assert len(CaptionEmbeddingStore.for_reading(tmp_path / "video", shape=(77, 1024)).names()) == 11

    with pytest.raises(SystemExit, match="model.outputs.video expects 77×1024.*77×768"):
        process_embeddings.main(["--stage", "2", "--config", str(config), "--device", "cpu", "--quiet",
                                 f"model.outputs.video.decoder_path={decoders['tiny_sd']}"])


# --------------------------------------------------------------------------- tiny decoders


def test_tiny_decoders_are_deterministic_and_skip_when_present(decoders, tmp_path):
    again = build_tiny_decoders(tmp_path)
    for name, folder in decoders.items():
        files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(again[name]) for p in again[name].rglob("*") if p.is_file())
        assert all((folder / f).read_bytes() == (again[name] / f).read_bytes() for f in files)
        assert sum((folder / f).stat().st_size for f in files) < 10 << 20
    stamp = (again["tiny_sd"] / "model_index.json").stat().st_mtime_ns
    build_tiny_decoders(tmp_path)
    assert (again["tiny_sd"] / "model_index.json").stat().st_mtime_ns == stamp
    index = json.loads((again["tiny_audioldm"] / "model_index.json").read_text())
    assert index["_class_name"] == "AudioLDMPipeline" and index["text_encoder"] == ["transformers", "ClapTextModelWithProjection"]


def test_tiny_tokenizers_round_trip(decoders):
    from transformers import CLIPTokenizer, RobertaTokenizer, RobertaTokenizerFast

    clip = CLIPTokenizer.from_pretrained(decoders["tiny_sd"] / "tokenizer")
    assert clip.model_max_length == 77
    # CLIP lower-cases and splits punctuation off, as the real one does.
    assert clip.decode(clip("A Café, isn't it?").input_ids, skip_special_tokens=True) == "a café , isn 't it ?"
    for cls in (RobertaTokenizer, RobertaTokenizerFast):
        roberta = cls.from_pretrained(decoders["tiny_audioldm"] / "tokenizer")
        ids = roberta("A dog barks, café").input_ids
        assert ids[0] == roberta.bos_token_id and ids[-1] == roberta.eos_token_id
        assert roberta.decode(ids, skip_special_tokens=True) == "A dog barks, café"


def test_tiny_decoders_default_location(capsys):
    from toollmm import tiny_decoders

    tiny_decoders.main([])  # builds into this checkout (git-ignored), or finds what is there
    printed = capsys.readouterr().out
    for name in SHAPES:
        assert f"{name}: {ROOT / DIFFUSION_DIR / name}" in printed
        assert (ROOT / DIFFUSION_DIR / name / "text_encoder" / "model.safetensors").is_file()


def test_attention_mask_follows_the_encoder_config_as_in_diffusers(decoders, encoders, tmp_path):
    copy = shutil.copytree(decoders["tiny_sd"], tmp_path / "masked")
    config = copy / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_attention_mask": True}))
    masked = CaptionEncoder(copy, "image").encode(CAPTIONS)
    assert torch.equal(masked, diffusers_reference("tiny_sd", copy, CAPTIONS))
    assert not torch.equal(masked, encoders["tiny_sd"].encode(CAPTIONS))

"""Any-to-any inference: the tiny full decoder pipelines, MediaDecoder's files, the Assistant
(signal-token runs → media, tool mode, streaming, prompt parsing), the prompt CLI and the GPU
bench script's tiny preset."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from conftest import CONFIGS, DATA, ROOT, TINY_CONFIG, TINY_LLM
from toollmm.assistant import Assistant, Reply, normalize_runs, parse_prompt
from toollmm.checkpoint import load_for_inference, save_checkpoint
from toollmm.config import ConfigError, load_config
from toollmm.data.toolmmbench import MediaRef
from toollmm.decoders import MediaDecoder
from toollmm.model.toollmm import build_model
from toollmm.output_modalities import write_mp4
from toollmm.signal_tokens import add_signal_tokens
from toollmm.tiny_decoders import build_tiny_decoders
from toollmm.tokenization import load_tokenizer

MODALITY = {"image": "tiny_sd", "video": "tiny_zeroscope", "audio": "tiny_audioldm"}
CATALOGUE = ["gpt2", "distilgpt2", "unknown", "openai/whisper-base"]
IMAGE = next(iter(sorted((DATA / "t2x_pairs" / "cc3m" / "images").iterdir())))
# Small decoder outputs for the tiny pipelines: 3 frames, 0.32 s (32 mel frames, 5120 samples).
OPTIONS = {"image": {}, "video": {"num_frames": 3}, "audio": {"audio_length_in_s": 0.32}}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict:
    folders = build_tiny_decoders(tmp_path_factory.mktemp("decoders"))
    return {modality: folders[name] for modality, name in MODALITY.items()}


@pytest.fixture(scope="module")
def checkpoint(tiny_default, tmp_path_factory):
    """A stage-3 any-to-any checkpoint (untrained: LLM, signal rows and projectors as built)."""
    config = load_config(3, [TINY_CONFIG, CONFIGS / "tiny_chain.yaml"], [
        f"model.llm_path={TINY_LLM}", "model.outputs.projector.hidden_size=32", "model.outputs.projector.encoder_layers=1",
        "model.outputs.projector.decoder_layers=1", "model.outputs.projector.ffn_size=64"])
    tokenizer = load_tokenizer(TINY_LLM)
    signal = add_signal_tokens(tokenizer, config.model.outputs)
    torch.manual_seed(0)
    model = build_model(config.model, 1024, stage=3, signal=signal)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "final", model, config, tokenizer, {"step": 0}, "encoder-id")


@pytest.fixture(scope="module")
def assistant(checkpoint, decoders, tmp_path_factory):
    return Assistant.from_checkpoint(checkpoint, "cpu", ["inference.max_new_tokens=6", "inference.chat_max_new_tokens=6"],
                                     decoders={m: str(f) for m, f in decoders.items()},
                                     output_dir=tmp_path_factory.mktemp("outputs"), steps=2, catalogue=CATALOGUE)


def fake_generate(ids: list[int]):
    """Stands in for llm.generate: returns ``ids`` as the response, feeding a streamer as generate does."""

    def generate(**kwargs):
        streamer = kwargs.get("streamer")
        if streamer is not None:
            streamer.put(torch.zeros(1, 0, dtype=torch.long))  # the prompt: no ids with inputs_embeds
            for token in ids:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return torch.tensor([ids])

    return generate


# --------------------------------------------------------------------------- tiny pipelines


def test_tiny_pipelines_load_with_their_classes(decoders):
    from diffusers import DiffusionPipeline

    expected = {"image": ("StableDiffusionPipeline", (1, 77, 768)), "video": ("TextToVideoSDPipeline", (1, 77, 1024)),
                "audio": ("AudioLDMPipeline", (1, 512))}
    for modality, folder in decoders.items():
        pipeline = DiffusionPipeline.from_pretrained(folder)
        assert type(pipeline).__name__ == expected[modality][0]
        assert MediaDecoder(folder, modality, "cpu").negative_embeds().shape == expected[modality][1]
        assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 10 << 20
    sd = DiffusionPipeline.from_pretrained(decoders["image"])
    assert sd.safety_checker is None and sd.unet.config.cross_attention_dim == 768
    audio = DiffusionPipeline.from_pretrained(decoders["audio"])
    assert audio.unet.config.projection_class_embeddings_input_dim == 512 and audio.vocoder.config.sampling_rate == 16000


def test_a_text_encoder_only_folder_is_completed_and_its_encoder_kept(decoders, tmp_path):
    old = tmp_path / "pretrained_checkpoint" / "diffusion_ckpt" / "tiny_sd"
    old.mkdir(parents=True)
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(decoders["image"] / part, old / part)
    (old / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "text_encoder": [
        "transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}))
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file() and p.name != "model_index.json"}
    build_tiny_decoders(tmp_path)
    assert all(p.read_bytes() == data for p, data in before.items())
    for part in ("unet", "vae", "scheduler"):  # and the same bytes a fresh build writes
        for new in (old / part).iterdir():
            assert new.read_bytes() == (decoders["image"] / part / new.name).read_bytes()
    stamp = (old / "model_index.json").stat().st_mtime_ns
    build_tiny_decoders(tmp_path)
    assert (old / "model_index.json").stat().st_mtime_ns == stamp  # complete: skipped


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_decode_writes_each_format(decoders, modality, tmp_path):
    decoder = MediaDecoder(decoders[modality], modality, "cpu")
    torch.manual_seed(0)
    embeds = torch.randn(decoder.negative_embeds().shape[1:])
    path = decoder.decode(embeds, out_path=tmp_path / "out", steps=2, **OPTIONS[modality])
    if modality == "image":
        assert path.suffix == ".png" and Image.open(path).size == (32, 32)
        again = decoder.decode(embeds, out_path=tmp_path / "again", steps=2)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again)))  # seeded
    elif modality == "video":
        import decord

        video = decord.VideoReader(str(path))
        assert path.suffix == ".mp4" and len(video) == 3 and video[0].shape[:2] == (16, 16)
    else:
        audio, rate = soundfile.read(path)
        assert path.suffix == ".wav" and rate == 16000 and audio.shape == (5120,) and np.abs(audio).max() > 0


def test_mp4_holds_every_frame(tmp_path):
    import av
    import decord

    frames = np.zeros((5, 16, 24, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(5)[:, None, None] * 50
    path = write_mp4(frames, tmp_path / "frames.mp4", fps=8)
    video = decord.VideoReader(str(path))
    # Frame count, rate and size from decord (this build returns 4 channels for small frames).
    assert len(video) == 5 and video.get_avg_fps() == 8 and video[0].shape[:2] == (16, 24)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"


# --------------------------------------------------------------------------- prompts and runs


def test_parse_prompt_tags_and_media_root(tmp_path):
    query, media = parse_prompt("<Image>a.png</Image> What is <audio> s/b.wav </audio>this? <Video>c.mp4</Video>")
    assert query == "What is this?"
    assert [(m, str(p)) for m, p in media] == [("image", "a.png"), ("audio", "s/b.wav"), ("video", "c.mp4")]
    _, media = parse_prompt("<Image>sub/a.png</Image> hi", media_root=tmp_path)
    assert media == [("image", (tmp_path / "sub" / "a.png").resolve())]
    for bad in ("<Image>../secret.png</Image>", "<Image>/etc/passwd</Image>", "<Image>sub/../../x.png</Image>"):
        with pytest.raises(ValueError, match="outside the media folder"):
            parse_prompt(bad, media_root=tmp_path)
    with pytest.raises(ValueError, match="empty <Image> tag"):
        parse_prompt("<Image> </Image> hi")


def test_normalize_runs_completes_and_warns():
    runs = {"image": [10, 11, 12, 13], "audio": [20, 21, 22]}
    assert normalize_runs([1, 10, 11, 12, 13, 2], runs) == ([1, 10, 11, 12, 13, 2], [])
    ids, warnings = normalize_runs([1, 10, 11, 2, 20, 21, 22, 10, 11, 12, 13, 12], runs)
    assert ids == [1, 10, 11, 12, 13, 2, 20, 21, 22, 10, 11, 12, 13, 10, 11, 12, 13]
    assert len(warnings) == 2 and "2 of 4 tokens" in warnings[0] and "1 of 4 tokens" in warnings[1]


# --------------------------------------------------------------------------- the Assistant


def test_chat_streams_the_reply_text(assistant):
    pieces = []
    reply = assistant.reply("Hello, who are you?", on_text=pieces.append)
    assert isinstance(reply, Reply) and reply.tool is None and reply.tools == [] and reply.media == []
    assert "".join(pieces).strip() == reply.text and len(pieces) > 1


@pytest.mark.slow
def test_signal_run_becomes_an_image(assistant, monkeypatch):
    tokenizer, signal = assistant.tokenizer, assistant.model.signal
    response = tokenizer.encode("Here it is") + signal.ids["image"] + tokenizer.encode("\n###")
    monkeypatch.setattr(assistant.model.llm, "generate", fake_generate(response))
    pieces = []
    reply = assistant.reply("Draw a red bus", on_text=pieces.append)
    assert reply.text == "Here it is" and "".join(pieces).strip() == reply.text and reply.warnings == []
    assert [m["modality"] for m in reply.media] == ["image"]
    assert Image.open(reply.media[0]["path"]).size == (32, 32)


@pytest.mark.slow
def test_run_cut_short_is_completed_with_a_warning(assistant, monkeypatch):
    signal = assistant.model.signal
    monkeypatch.setattr(assistant.model.llm, "generate", fake_generate(signal.ids["audio"][:3]))
    reply = assistant.reply("Make the sound of rain")
    assert [m["modality"] for m in reply.media] == ["audio"]
    assert soundfile.info(reply.media[0]["path"]).samplerate == 16000
    assert reply.warnings == ["the audio signal-token run was incomplete (3 of 8 tokens); completed it to decode the output"]


def test_missing_or_failing_decoder_is_a_warning_not_an_error(checkpoint, decoders, tmp_path, monkeypatch):
    # The image decoder is Zeroscope's folder (a video pipeline, 1024-wide where the projector gives 768).
    assistant = Assistant.from_checkpoint(checkpoint, "cpu", decoders={"video": str(tmp_path / "nowhere"),
                                                                       "image": str(decoders["video"])},
                                          output_dir=tmp_path, steps=1)
    signal, tokenizer = assistant.model.signal, assistant.tokenizer
    response = tokenizer.encode("A clip") + signal.ids["video"] + signal.ids["image"]
    monkeypatch.setattr(assistant.model.llm, "generate", fake_generate(response))
    reply = assistant.reply("Make a video")
    assert reply.text == "A clip" and reply.media == [] and len(reply.warnings) == 2
    assert "no video decoder at" in reply.warnings[1] and "image decoder at" in reply.warnings[0]
    # The folder's pipeline class is checked against the modality's registry entry before it loads.
    assert "holds a TextToVideoSDPipeline, but the image decoder is a StableDiffusionPipeline" in reply.warnings[0]


def test_tool_mode_answers_from_the_catalogue(assistant):
    texts = []
    reply = assistant.reply("Transcribe this recording please.", mode="tool", top_k=3, on_text=texts.append)
    assert reply.tool in CATALOGUE and reply.text == f"{{'api_name': {reply.tool}}}" and texts == [reply.text]
    scores = [t["score"] for t in reply.tools]
    assert len(reply.tools) == 3 and {t["tool"] for t in reply.tools} <= set(CATALOGUE) and scores == sorted(scores, reverse=True)
    single = assistant.reply("Transcribe this recording please.", mode="tool")
    assert single.tools == [{"tool": single.tool, "score": None}] and single.tool == reply.tool


def test_settings_come_from_the_overrides_and_the_device_from_the_weights(checkpoint):
    """``__init__`` takes a loaded model and computes its device; tool mode's k and method are the
    config's ``inference`` settings unless a request names its k."""
    model, tokenizer, config, _ = load_for_inference(checkpoint, "cpu", overrides=["inference.top_k=2"])
    assistant = Assistant(model, tokenizer, config, catalogue=CATALOGUE)
    assert assistant.device == torch.device("cpu") and assistant.settings.top_k == 2
    beam = assistant.reply("Transcribe this recording please.", mode="tool")
    assert len(beam.tools) == 2 and len(assistant.reply("Transcribe this.", mode="tool", top_k=3).tools) == 3
    assistant.settings.top_k_method = "exact"
    exact = assistant.reply("Transcribe this recording please.", mode="tool")
    # 4 beams over a catalogue of 4 find every answer: the same tools as scoring each one.
    assert [t["tool"] for t in exact.tools] == [t["tool"] for t in beam.tools]
    assert [t["score"] for t in exact.tools] == pytest.approx([t["score"] for t in beam.tools], abs=1e-4)
    with pytest.raises(ConfigError, match="unknown config key inference.topk"):
        load_for_inference(checkpoint, "cpu", overrides=["inference.topk=2"])


def test_batch_equals_one_at_a_time_and_media_are_summed(assistant):
    prompts = ["Describe it.", "Hi"]
    media = [[("image", IMAGE), ("image", IMAGE)], []]
    batch = assistant.reply_batch(prompts, media)
    alone = [assistant.reply(p, m) for p, m in zip(prompts, media)]
    assert [r.text for r in batch] == [r.text for r in alone]
    # Summed before the projector, as training sums a record's features (record_feature).
    feature = assistant._feature(MediaRef("image", IMAGE))
    torch.testing.assert_close(assistant._slot_feature(media[0], []), 2 * feature)
    warnings = []
    assert assistant._slot_feature([("image", IMAGE.with_name("missing.jpg"))], warnings) is None
    assert "no such file" in warnings[0]


# --------------------------------------------------------------------------- CLI and bench


def test_inference_cli_prompt_mode(checkpoint, tmp_path):
    from toollmm.cli import inference

    (tmp_path / "catalogue.json").write_text(json.dumps(CATALOGUE))
    shutil.copy(IMAGE, tmp_path / "photo.jpg")
    (tmp_path / "prompts.txt").write_text("<Image>photo.jpg</Image> Which tool?\nTranscribe this.\n")
    output = tmp_path / "answers.json"
    inference.main(["--ckpt", str(checkpoint), "--prompts-file", str(tmp_path / "prompts.txt"), "--mode", "tool",
                    "inference.top_k=2", "--media-root", str(tmp_path), "--catalogue", str(tmp_path / "catalogue.json"),
                    "--output", str(output)])
    rows = json.loads(output.read_text())
    assert [r["query"] for r in rows] == ["Which tool?", "Transcribe this."]
    assert rows[0]["input_media"] == [{"modality": "image", "path": str((tmp_path / "photo.jpg").resolve())}]
    assert all(r["tool"] in CATALOGUE and len(r["tools"]) == 2 and r["media"] == [] for r in rows)
    assert set(rows[0]) == {"prompt", "query", "input_media", "text", "tools", "tool", "media", "warnings"}
    with pytest.raises(SystemExit, match="outside the media folder"):
        inference.main(["--ckpt", str(checkpoint), "--prompt", "<Image>../x.png</Image> hi", "--media-root",
                        str(tmp_path), "--output", str(output)])


@pytest.fixture()
def bench(monkeypatch):
    """The bench script as its command line loads it: its folder (make_random_llm) on the path."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("any_to_any_gpu", ROOT / "bench" / "any_to_any_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_configs_have_the_published_shapes(bench):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # shapes only: no memory, no init time
        counts = [sum(p.numel() for p in m.parameters()) for m in (
            UNet2DConditionModel(**bench.unet_config("full")), AutoencoderKL(**bench.vae_config("full")),
            CLIPTextModel(CLIPTextConfig(**bench.text_encoder_config("full"))))]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD-1.5's UNet, VAE and CLIP text encoder
    assert bench.llm_config("full")["hidden_size"] == 4096 and bench.llm_config("full")["num_hidden_layers"] == 32


@pytest.mark.slow
def test_bench_runs_end_to_end_with_tiny_shapes(bench, tmp_path):
    result = bench.main(["--tiny", "--out", str(tmp_path)])
    assert result["conditioning_shape"] == [1, 77, 32] and result["image_size"] == [32, 32]
    assert set(result["seconds"]) == {"build_llm", "build_decoder", "llm_generate", "hidden_states_and_projector",
                                      "negative_embeds", "diffusion"}
    assert Image.open(tmp_path / "any_to_any.png").size == (32, 32)
    assert json.loads((tmp_path / "any_to_any.json").read_text())["png"] == str(tmp_path / "any_to_any.png")

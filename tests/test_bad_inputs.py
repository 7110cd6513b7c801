"""Bad inputs across the entry points: each case asserts the exit status and the message (CLIs)
or the counted reason and its note (rows, media). All cases fail in validation, before any
model loads, so the entry points run in this process; the table in the reliability docs is
this file's cases."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import pytest

from conftest import DATA, TINY_CONFIG
from test_reliability import png_header, row

MEDIA = DATA / "assets"


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """A case that passed validation would go on to train: it fails here instead."""
    from toollmm import recipe

    monkeypatch.setattr(recipe, "init_distributed", lambda: pytest.fail("passed validation and reached the model"))


def exit_of(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, message) of an entry point that must stop: SystemExit("text") exits 1 with
    the text, argparse exits 2 with its message on stderr."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    code = stop.value.code
    if isinstance(code, str):
        return 1, code
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- files that are not a JSON list

BAD_FILES = {
    "malformed": (b'[{"id": 1, "conversations": [}', "not valid JSON (Expecting value: line 1 column 30"),
    "truncated": (json.dumps([row("q")]).encode()[:-10], "not valid JSON (Unterminated string starting at: line 1 column 168"),
    "object": (b'{"rows": []}', "expected a JSON list of ToolMMBench rows, got dict"),
    "null": (b"null", "expected a JSON list of ToolMMBench rows, got null"),
    "number": (b"42", "expected a JSON list of ToolMMBench rows, got int"),
    "string": (b'"rows"', "expected a JSON list of ToolMMBench rows, got str"),
    "empty_file": (b"", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    "jsonl": ((json.dumps(row("a")) + "\n" + json.dumps(row("b")) + "\n").encode(), "that is JSON Lines: wrap the rows in one list"),
    "utf16_le": (json.dumps([row("q")]).encode("utf-16"), "UTF-16 text; save it as UTF-8"),
    "utf16_be": (b"\xfe\xff" + json.dumps([row("q")]).encode("utf-16-be"), "UTF-16 text; save it as UTF-8"),
    "deeply_nested": (b"[" * 100000 + b"]" * 100000, "JSON nested too deeply to read"),
    "binary": (bytes(range(256)) * 4, "not valid JSON"),
}


@pytest.fixture
def bad_file(tmp_path, request):
    content, expected = BAD_FILES[request.param]
    path = tmp_path / f"{request.param}.json"
    path.write_bytes(content)
    return path, expected


@pytest.mark.parametrize("bad_file", sorted(BAD_FILES), indirect=True)
def test_inference_refuses_an_unreadable_data_file_before_loading(bad_file, tmp_path, capsys):
    from toollmm.cli import inference

    path, expected = bad_file
    status, message = exit_of(inference.main, ["--ckpt", str(tmp_path / "no_ckpt"), "--data", str(path),
                                               "--output", str(tmp_path / "out.json")], capsys)
    assert status == 1 and message.startswith(f"inference: --data {path}: ") and expected in message
    assert "\n" not in message and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("bad_file", sorted(BAD_FILES), indirect=True)
def test_extract_features_refuses_an_unreadable_data_file(bad_file, tmp_path, capsys):
    from toollmm.cli import extract_features

    path, expected = bad_file
    status, message = exit_of(extract_features.main, ["--config", str(TINY_CONFIG), "--data", str(path)], capsys)
    assert status == 1 and message.startswith(f"extract_features: --data {path}: ") and expected in message


@pytest.mark.parametrize("bad_file", sorted(BAD_FILES), indirect=True)
def test_preprocess_refuses_data_with_no_usable_row(bad_file, tmp_path, capsys):
    from toollmm.cli import preprocess_dataset

    path, expected = bad_file
    status, message = exit_of(preprocess_dataset.main, [
        "--config", str(TINY_CONFIG), "--output-dir", str(tmp_path / "out"),
        f"data.train_files=[{{path: {path}, media_root: {tmp_path}}}]", "data.eval_files=[]"], capsys)
    assert status == 1 and expected in message
    assert message.startswith(f"preprocess_dataset: no usable training row in data.train_files: {path}: ")
    assert not (tmp_path / "out" / "train.json").exists()


def test_empty_list_and_bom(tmp_path, capsys):
    from toollmm.cli import inference
    from toollmm.data.toolmmbench import read_toolmmbench

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    status, message = exit_of(inference.main, ["--ckpt", str(tmp_path), "--data", str(empty), "--output", str(tmp_path / "o.json")], capsys)
    assert (status, message) == (1, f"inference: --data {empty}: the list is empty, nothing to answer")
    broken = tmp_path / "broken_rows.json"
    broken.write_text(json.dumps([turns(first="gpt", second="human"), {"id": 3}]))
    status, message = exit_of(inference.main, ["--ckpt", str(tmp_path), "--data", str(broken), "--output", str(tmp_path / "o.json")], capsys)
    assert (status, message) == (1, f"inference: --data {broken}: none of its 2 rows is usable (malformed row: broken_rows.json "
                                    "row 0 (id None): conversation roles are ['gpt', 'human']: the query comes 'from' 'human', the tool "
                                    "'from' 'gpt')")
    bom = tmp_path / "bom.json"  # a UTF-8 byte-order mark is read, not refused
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([row("a request"), row("another")]).encode())
    records, report = read_toolmmbench(bom, tmp_path)
    assert [r.query for r in records] == ["a request", "another"] and not report.skipped


# --------------------------------------------------------------------------- rows

def turns(query="q", tool="t", first="human", second="gpt", **extra):
    return {"conversations": [{"from": first, "value": query}, {"from": second, "value": tool}], **extra}


BAD_ROWS = [
    ("a string row", "row is a str, not an object"),
    (42, "row is a int, not an object"),
    (None, "row is a NoneType, not an object"),
    ([], "row is a list, not an object"),
    ({"id": 1}, "'conversations' missing or shorter than 2 turns"),
    ({"conversations": "not a list"}, "'conversations' missing or shorter than 2 turns"),
    ({"conversations": []}, "'conversations' missing or shorter than 2 turns"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "'conversations' missing or shorter than 2 turns"),
    ({"conversations": None}, "'conversations' missing or shorter than 2 turns"),
    ({"conversations": [["human", "q"], ["gpt", "t"]]}, "a turn lacks 'value'"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "t"}]}, "a turn lacks 'value'"),
    (turns(query=7), "empty or non-string query"),
    (turns(query=""), "empty or non-string query"),
    (turns(query="   "), "empty or non-string query"),
    (turns(query=None), "empty or non-string query"),
    (turns(query=["q"]), "empty or non-string query"),
    (turns(tool=3), "tool (conversations[1].value) must be a non-empty string"),
    (turns(tool=""), "tool (conversations[1].value) must be a non-empty string"),
    (turns(tool=" "), "tool (conversations[1].value) must be a non-empty string"),
    (turns(tool=[]), "tool (conversations[1].value) must be a non-empty string"),
    (turns(tool=[1, 2]), "tool (conversations[1].value) must be a non-empty string"),
    (turns(tool=None), "tool (conversations[1].value) must be a non-empty string"),
    (turns(tool=["ok/tool", ""]), "tool (conversations[1].value) must be a non-empty string"),
    (turns(first="gpt", second="human"), "conversation roles are ['gpt', 'human']"),
    (turns(first="gpt", second="gpt"), "conversation roles are ['gpt', 'gpt']"),
    (turns(first="human", second="human"), "conversation roles are ['human', 'human']"),
    (turns(first="user", second="gpt"), "conversation roles are ['user', 'gpt']"),
    (turns(tool="tool\n### Human: hi"), "tool name holds '###'"),
    (turns(tool=["ok/tool", "bad ### tool"]), "tool name holds '###'"),
    (turns(ambiguity=1.5), "ambiguity must be -1 or a type id, got 1.5"),
    (turns(ambiguity=[1]), "ambiguity must be -1 or a type id, got [1]"),
    (turns(ambiguity={"a": 1}), "ambiguity must be -1 or a type id"),
    (turns(ifambiguity="maybe"), "ifambiguity must be true or false, got 'maybe'"),
    (turns(ifambiguity=2), "ifambiguity must be true or false, got 2"),
    (turns(onetomulti=[True]), "onetomulti must be true or false, got [True]"),
    (turns(input_modality="smell"), "input_modality 'smell' is not one of"),
    (turns(input_modality=["image"]), "input_modality ['image'] is not one of"),
    (turns(input_modality="image", image_path=""), "input_modality is image but 'image_path' is empty"),
    (turns(input_modality="audio", audio_path=12), "input_modality is audio but 'audio_path' is empty"),
    (turns(input_modality="video"), "input_modality is video but 'video_path' is empty"),
]


@pytest.mark.parametrize("index", range(len(BAD_ROWS)))
def test_a_malformed_row_is_a_counted_skip_with_its_reason(tmp_path, index):
    from toollmm.data.toolmmbench import read_toolmmbench

    bad, reason = BAD_ROWS[index]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([row("a good request"), bad]))
    records, report = read_toolmmbench(data, tmp_path, "text_only")
    assert [r.query for r in records] == ["a good request"]
    assert dict(report.skipped) == {"malformed row": 1}
    (note,) = report.examples["malformed row"]
    assert note.startswith("rows.json row 1") and reason in note, note


# --------------------------------------------------------------------------- media


def wav_header(rate: int, channels: int = 1, data: bytes = b"\x00\x00" * 400) -> bytes:
    """A PCM-16 WAV whose header claims ``rate`` Hz and ``channels`` channels."""
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * 2 * channels, 2 * channels, 16)
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", len(data)) + data


def png_claiming(width: int, height: int) -> bytes:
    """A PNG that PIL opens (IHDR, a few IDAT bytes, IEND) whose header claims width × height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return png_header(width, height) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def float_wav(values) -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(values, np.float32), 16000, subtype="FLOAT", format="WAV")
    return buffer.getvalue()


MEDIA_CASES = {
    "audio_rate_2e31": ("audio", lambda: wav_header(2**31 - 1), {}, "sample rate 2147483647 Hz is outside data.media_limits (4000-192000 Hz)"),
    "audio_rate_1hz": ("audio", lambda: wav_header(1, data=b"\x00\x00" * 40000), {}, "sample rate 1 Hz is outside"),
    "audio_rate_3999": ("audio", lambda: wav_header(3999), {}, "sample rate 3999 Hz is outside"),
    "audio_rate_192001": ("audio", lambda: wav_header(192001), {}, "sample rate 192001 Hz is outside"),
    "audio_channels_9": ("audio", lambda: wav_header(16000, 9, b"\x00\x00" * 900), {}, "9 channels, over data.media_limits.max_audio_channels=8"),
    "audio_too_long": ("audio", lambda: (MEDIA / "test.wav").read_bytes(), {"max_audio_seconds": 1.0}, "s long, over data.media_limits.max_audio_seconds=1"),
    "audio_nan": ("audio", lambda: float_wav([np.nan] * 32000), {}, "audio samples hold NaN or infinite values"),
    "audio_inf": ("audio", lambda: float_wav([0.1] * 16000 + [np.inf] + [0.1] * 16000), {}, "audio samples hold NaN or infinite values"),
    "image_40000_square": ("image", lambda: png_claiming(40000, 40000), {}, "image is over data.media_limits.max_image_pixels=50000000 (Image size (1600000000 pixels) exceeds limit"),
    "image_8000_square": ("image", lambda: png_claiming(8000, 8000), {}, "image is 8000 × 8000 pixels, over"),
    "image_1x60M": ("image", lambda: png_claiming(1, 60_000_000), {}, "image is 1 × 60000000 pixels, over"),
    "image_small_limit": ("image", lambda: (MEDIA / "bird_image.jpg").read_bytes(), {"max_image_pixels": 100}, "pixels, over data.media_limits.max_image_pixels=100"),
    "video_frames": ("video", lambda: (MEDIA / "test.mp4").read_bytes(), {"max_video_frames": 10}, "over data.media_limits (max_video_frames=10"),
    "video_seconds": ("video", lambda: (MEDIA / "test.mp4").read_bytes(), {"max_video_seconds": 0.5}, "max_video_seconds=0.5): not decoded"),
    "video_pixels": ("video", lambda: (MEDIA / "test.mp4").read_bytes(), {"max_video_pixels": 1000}, "video frames are 576 × 320 pixels, over data.media_limits.max_video_pixels=1000: the other 9 frames were not decoded"),
}


@pytest.mark.parametrize("case", sorted(MEDIA_CASES))
def test_media_past_a_limit_is_refused_before_decoding(tmp_path, case):
    from toollmm import media
    from toollmm.config import MediaLimits
    from toollmm.modalities import MODALITIES

    modality, content, limits, expected = MEDIA_CASES[case]
    path = tmp_path / f"{case}.{ {'audio': 'wav', 'image': 'png', 'video': 'mp4'}[modality]}"
    path.write_bytes(content())
    media.set_limits(MediaLimits(**limits))
    try:
        with pytest.raises(media.MediaError) as refused:
            MODALITIES[modality].load(path)
    finally:
        media.set_limits(MediaLimits())
    assert str(refused.value).startswith(f"{path}: ") and expected in str(refused.value), str(refused.value)


# --------------------------------------------------------------------------- training config and output folder

TRAIN_CASES = {
    "log_every_steps_0": (["train.log_every_steps=0"], "train.log_every_steps must be at least 1, got 0"),
    "max_steps_negative": (["train.max_steps=-1"], "train.max_steps must be at least 0, got -1"),
    "seed_negative": (["train.seed=-1"], "train.seed must be at least 0 and at most 4294967295, got -1"),
    "seed_past_numpy": (["train.seed=4294967296"], "train.seed must be at least 0 and at most 4294967295, got 4294967296"),
    "split_seed_negative": (["data.split.seed=-3"], "data.split.seed must be at least 0 and at most 4294967295, got -3"),
    "max_tgt_len_negative": (["data.max_tgt_len=-5"], "data.max_tgt_len must be at least 1, got -5"),
    "max_tgt_len_0": (["data.max_tgt_len=0"], "data.max_tgt_len must be at least 1, got 0"),
    "max_time_negative": (["train.max_time_s=-1"], "train.max_time_s must be at least 0, got -1.0"),
    "max_time_inf": (["train.max_time_s=.inf"], "train.max_time_s must be at least 0, got inf (not finite)"),
    "lr_inf": (["train.learning_rate=.inf"], "train.learning_rate must be above 0, got inf (not finite)"),
    "lr_nan": (["train.learning_rate=.nan"], "train.learning_rate must be above 0, got nan (not finite)"),
    "lr_negative": (["train.learning_rate=-0.001"], "train.learning_rate must be above 0, got -0.001"),
    "lr_zero": (["train.learning_rate=0"], "train.learning_rate must be above 0, got 0.0"),
    "lr_word": (["train.learning_rate=fast"], "train.learning_rate: expected float, got 'fast'"),
    "lr_list": (["train.learning_rate=[1]"], "train.learning_rate: expected float, got [1]"),
    "lora_dropout_1.5": (["model.lora.dropout=1.5"], "model.lora.dropout must be at least 0 and at most 1, got 1.5"),
    "lora_dropout_negative": (["model.lora.dropout=-0.1"], "model.lora.dropout must be at least 0 and at most 1, got -0.1"),
    "lora_alpha_0": (["model.lora.alpha=0"], "model.lora.alpha must be above 0, got 0"),
    "lora_r_0": (["model.lora.r=0"], "model.lora.r must be at least 1, got 0"),
    "lora_unknown_target": (["model.tuning=lora", "model.lora.target_modules=[q_proj,qkv]"],
                            "model.lora.target_modules: ['qkv'] are not linear layers of"),
    "lora_no_target": (["model.tuning=lora", "model.lora.target_modules=[]"], "model.lora.target_modules is empty"),
    "attention_unknown": (["model.attn_implementation=magic"], "model.attn_implementation: 'magic' is not one of"),
    "flex_attention_cpu": (["model.attn_implementation=flex_attention"], "model.attn_implementation=flex_attention trains on CUDA only"),
    "fp16_cpu": (["model.dtype=fp16"], "model.dtype=fp16 trains on CUDA only"),
    "dtype_unknown": (["model.dtype=fp64"], "model.dtype: 'fp64' is not one of ['bf16', 'fp16', 'fp32']"),
    "tuning_unknown": (["model.tuning=half"], "model.tuning: 'half' is not one of ['lora', 'full']"),
    "num_workers_negative": (["train.num_workers=-1"], "train.num_workers must be at least 0, got -1"),
    "micro_batch_0": (["train.micro_batch_size=0"], "train.micro_batch_size must be at least 1, got 0"),
    "accumulation_0": (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps must be at least 1, got 0"),
    "epochs_0": (["train.epochs=0"], "train.epochs must be at least 1, got 0"),
    "epochs_word": (["train.epochs=many"], "train.epochs: expected int, got 'many'"),
    "epochs_float": (["train.epochs=1.5"], "train.epochs: expected int, got 1.5"),
    "keep_last_negative": (["train.keep_last=-1"], "train.keep_last must be at least 0, got -1"),
    "save_every_negative": (["train.save_every_steps=-2"], "train.save_every_steps must be at least 0, got -2"),
    "warmup_1.5": (["train.warmup_rate=1.5"], "train.warmup_rate must be at least 0 and at most 1, got 1.5"),
    "warmup_negative": (["train.warmup_rate=-0.1"], "train.warmup_rate must be at least 0 and at most 1, got -0.1"),
    "nonfinite_limit_0": (["train.max_nonfinite_in_a_row=0"], "train.max_nonfinite_in_a_row must be at least 1, got 0"),
    "pack_length_0": (["train.pack_length=0"], "train.pack_length must be at least 1, got 0"),
    "pack_width_negative": (["train.pack_width_multiple=-8"], "train.pack_width_multiple must be at least 0, got -8"),
    "pack_width_unpacked": (["train.packing=false", "train.pack_width_multiple=128"],
                            "train.pack_width_multiple rounds the width of packed rows, and train.packing is off"),
    "compile_mode_unknown": (["train.compile=true", "train.compile_mode=fast"], "train.compile_mode"),
    "compile_mode_uncompiled": (["train.compile=false", "train.compile_mode=max-autotune-no-cudagraphs"],
                                "train.compile_mode=max-autotune-no-cudagraphs is the mode of train.compile, which is off"),
    "compile_mode_cuda_graphs": (["train.compile=true", "train.compile_mode=reduce-overhead"],
                                 "'reduce-overhead' is not one of ['default', 'max-autotune-no-cudagraphs']"),
    "profile_negative": (["train.profile_steps=-1"], "train.profile_steps must be at least 0, got -1"),
    "checkpoint_above_negative": (["train.checkpoint_above_tokens=-1"], "train.checkpoint_above_tokens must be at least 0, got -1"),
    "length_groups_0": (["train.length_group_batches=0"], "train.length_group_batches must be at least 1, got 0"),
    "zero_stage_4": (["train.zero_stage=4"], "train.zero_stage must be 1, 2 or 3"),
    "batch_arithmetic": (["train.train_batch_size=7"], "train.train_batch_size=7 but micro_batch_size (16)"),
    "train_batch_0": (["train.train_batch_size=0"], "train.train_batch_size must be at least 1, got 0"),
    "top_p_0": (["inference.top_p=0"], "inference.top_p must be above 0 and at most 1, got 0.0"),
    "top_p_1.5": (["inference.top_p=1.5"], "inference.top_p must be above 0 and at most 1, got 1.5"),
    "temperature_negative": (["inference.temperature=-1"], "inference.temperature must be at least 0, got -1.0"),
    "inference_batch_0": (["inference.batch_size=0"], "inference.batch_size must be at least 1, got 0"),
    "max_new_tokens_0": (["inference.max_new_tokens=0"], "inference.max_new_tokens must be at least 1, got 0"),
    "top_k_0": (["inference.top_k=0"], "inference.top_k must be at least 1, got 0"),
    "max_batch_tokens_0": (["inference.max_batch_tokens=0"], "inference.max_batch_tokens must be at least 1 (or null: no cap), got 0"),
    "test_fraction_1": (["data.split.test_fraction=1.0"], "data.split.test_fraction must be in [0, 1), got 1.0"),
    "test_fraction_negative": (["data.split.test_fraction=-0.1"], "data.split.test_fraction must be in [0, 1), got -0.1"),
    "audio_seconds_0": (["data.media_limits.max_audio_seconds=0"], "data.media_limits.max_audio_seconds must be above 0, got 0.0"),
    "image_pixels_0": (["data.media_limits.max_image_pixels=0"], "data.media_limits.max_image_pixels must be at least 1, got 0"),
    "missing_media_unknown": (["data.missing_media=sometimes"], "data.missing_media: 'sometimes' is not one of"),
    "unknown_key": (["train.epochz=1"], "unknown config key train.epochz; allowed here:"),
    "unknown_section": (["trian.epochs=1"], "unknown config key trian; allowed here:"),
    "override_without_equals": (["train.epochs"], "override 'train.epochs' must look like key.subkey=value"),
    "held_out_without_test": (["train.held_out_tools=true", "data.eval_files=[]", "data.split.test_fraction=0"],
                              "train.held_out_tools measures the test split's tool rows in stage 3"),
    "llm_missing": (["model.llm_path=/nonexistent/llm"], "model.llm_path: /nonexistent/llm has no config.json"),
    "imagebind_missing": (["model.imagebind_path=/nonexistent/ib.pth"], "model.imagebind_path: /nonexistent/ib.pth does not exist"),
    "train_file_missing": (["data.train_files=[{path: /nonexistent/rows.json, media_root: /tmp}]"],
                           "data.train_files[0].path: /nonexistent/rows.json does not exist"),
    "init_from_missing": (["train.init_from=/nonexistent/checkpoint-3"], "train.init_from: /nonexistent/checkpoint-3 does not exist"),
    "deepspeed_missing": (["train.deepspeed_config=nonexistent.json"], "train.deepspeed_config: nonexistent.json not found"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_training_refuses_a_bad_config_before_any_model(tiny_default, tmp_path, capsys, case):
    from toollmm.cli import train

    overrides, expected = TRAIN_CASES[case]
    status, message = exit_of(train.main, ["--stage", "3", "--config", str(TINY_CONFIG),
                                           f"train.output_dir={tmp_path / 'run'}", *overrides], capsys)
    assert status == 1 and message.startswith("train: ") and expected in message, message
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


DS_FILES = {
    "not_json": (b'{"optimizer": ', "is not readable JSON (Expecting value"),
    "a_list": (b"[1, 2]", "must hold a JSON object of DeepSpeed settings"),
    "sets_the_stage": (b'{"zero_optimization": {"stage": 3}}',
                       "sets zero_optimization.stage, which the run config sets (zero_optimization.stage: train.zero_stage)"),
    "not_utf8": (b'{"a": "\xff"}', "is not readable JSON"),
}


@pytest.mark.parametrize("case", sorted(DS_FILES))
def test_a_malformed_deepspeed_config_is_named(tiny_default, tmp_path, capsys, case):
    from toollmm.cli import train

    content, expected = DS_FILES[case]
    ds = tmp_path / "ds.json"
    ds.write_bytes(content)
    status, message = exit_of(train.main, ["--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={tmp_path / 'run'}",
                                           f"train.deepspeed_config={ds}"], capsys)
    assert status == 1 and message.startswith(f"train: train.deepspeed_config: {ds} ") and expected in message


def earlier_run(folder: Path, *names: str) -> None:
    for name in names:
        target = folder / name
        if name.endswith((".json", ".jsonl", ".yaml", ".pt", "complete")):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}")
        else:
            target.mkdir(parents=True)


OUTPUT_CASES = {
    "a_file": (lambda d: d.parent.joinpath("run").write_text("x"), [], "train.output_dir: {run} is a file, not a folder"),
    "under_a_file": (lambda d: d.parent.joinpath("blocker").write_text("x"), ["output=blocker/run"],
                     "train.output_dir: cannot create {root}/blocker/run (Not a directory)"),
    "finished_run": (lambda d: earlier_run(d, "config.yaml", "metrics.jsonl", "checkpoint-6", "final", "resume/step_6/complete"), [],
                     "{run} already holds a run (state step_6). Pass --resume to continue it"),
    "checkpoints_only": (lambda d: earlier_run(d, "checkpoint-3"), [], "{run} already holds a run (checkpoint-3)."),
    "killed_before_a_state": (lambda d: earlier_run(d, "config.yaml", "data_report.json"), [],
                              "{run} already holds a run (config.yaml, data_report.json)."),
    "resume_nothing": (lambda d: None, ["--resume"], "--resume given but {run}/resume holds no complete training state; "
                                                      "drop --resume to start fresh"),
    "resume_no_state": (lambda d: earlier_run(d, "config.yaml", "resume/step_2/mp_rank_00_model_states.pt"), ["--resume"],
                        "holds no complete training state; start over with train.overwrite=true or set train.output_dir"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_an_output_folder_that_cannot_take_this_run_is_refused(tiny_default, tmp_path, capsys, case):
    from toollmm.cli import train

    prepare, extra, expected = OUTPUT_CASES[case]
    run = tmp_path / "run"
    if case not in ("a_file", "under_a_file"):
        run.mkdir()
    prepare(run)
    target = tmp_path / extra[0].split("=", 1)[1] if extra[:1] and extra[0].startswith("output=") else run
    args = [a for a in extra if not a.startswith("output=")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    status, message = exit_of(train.main, ["--stage", "3", "--config", str(TINY_CONFIG), f"train.output_dir={target}", *args], capsys)
    assert status == 1 and expected.format(run=run, root=tmp_path) in message, message
    assert "train.overwrite=true" in message or case in ("a_file", "under_a_file", "resume_nothing")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing deleted, nothing written


def test_pruning_touches_only_the_folders_training_names(tmp_path):
    from toollmm.run_state import last_checkpoint, mark_complete, prune, resume_tags, run_files

    user = ["checkpoint-6-backup", "checkpoint-best", "checkpoint-", "checkpoint-x7", "notes", "resume/step_best",
            "resume/step_3_old", "checkpoint-2.partial.bak"]
    ours = ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8.partial", "resume/step_2", "resume/step_4",
            "resume/step_6", "resume/step_8"]
    for name in user + ours:
        (tmp_path / name).mkdir(parents=True)
    for step in (2, 4, 6):
        mark_complete(tmp_path, f"step_{step}")
    assert resume_tags(tmp_path) == ["step_6", "step_4", "step_2"]
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    prune(tmp_path, keep_last=2)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_dir())
    assert left == sorted(user + ["checkpoint-4", "checkpoint-6", "resume", "resume/step_4", "resume/step_6"])
    assert sorted(p.name for p in run_files(tmp_path)) == ["checkpoint-4", "checkpoint-6", "resume"]


def test_overwrite_deletes_only_the_earlier_runs_files(tiny_default, tmp_path):
    from toollmm.run_state import check_output_dir
    from toollmm.config import load_config

    run = tmp_path / "run"
    earlier_run(run, "config.yaml", "metrics.jsonl", "held_out.json", "checkpoint-4", "checkpoint-6.partial", "final",
                "resume/step_4/complete", "tensorboard", "checkpoint-best", "my_notes.json")
    config = load_config(3, [TINY_CONFIG], [f"train.output_dir={run}", "train.overwrite=true"])
    names = sorted(p.name for p in check_output_dir(run, config))
    assert names == ["checkpoint-4", "checkpoint-6.partial", "config.yaml", "final", "held_out.json", "metrics.jsonl",
                     "resume", "tensorboard"]  # checkpoint-best and my_notes.json stay


def test_non_finite_checkpoint_weights_are_refused_on_load(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from toollmm.checkpoint import read_weights
    from toollmm.cli import inference

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    ckpt = tmp_path / "checkpoint-4"
    save_file({"input_projector.weight": torch.tensor([[1.0, float("nan")]]), "input_projector.bias": torch.zeros(1)},
              ckpt / "trainable.safetensors")
    with pytest.raises(ValueError) as refused:
        read_weights(ckpt)
    assert str(refused.value) == (f"{ckpt}/trainable.safetensors: 1 tensors hold NaN or infinite values (e.g. "
                                  "input_projector.weight): the weights of a diverged run; use another checkpoint "
                                  "(this run also has checkpoint-2).")
    for name in ("config.yaml", "checkpoint.json"):
        (ckpt / name).write_text("{}")
    status, message = exit_of(inference.main, ["--ckpt", str(ckpt), "--prompt", "hello", "--output", str(tmp_path / "o.json")], capsys)
    assert (status, message) == (1, f"inference: {refused.value}")


CACHE_ENTRIES = {
    "nan": (lambda: torch.full((8,), float("nan")), "has shape [8] (expected [8]) and non-finite values; recomputing it"),
    "two_dimensions": (lambda: torch.zeros(2, 8), "has shape [2, 8] (expected [8]); recomputing it"),
    "wrong_length": (lambda: torch.zeros(5), "has shape [5] (expected [8]); recomputing it"),
}


@pytest.mark.parametrize("case", sorted(CACHE_ENTRIES))
def test_a_bad_feature_cache_entry_is_recomputed(tmp_path, caplog, case):
    from toollmm.data.toolmmbench import MediaRef
    from toollmm.features import FeatureCache

    media = tmp_path / "a.wav"
    media.write_bytes(b"audio bytes")
    ref = MediaRef("audio", media)
    cache = FeatureCache(tmp_path / "cache", "encoder", dim=8)
    cache.store(ref, torch.ones(8))
    assert torch.equal(cache.load(ref), torch.ones(8))
    make, expected = CACHE_ENTRIES[case]
    cache.store(ref, make())
    assert cache.load(ref) is None and expected in caplog.text


@pytest.mark.parametrize("base_check", ["refuse", "warn"])
def test_a_checkpoint_on_another_base_of_the_same_shape(tiny_default, tmp_path, caplog, base_check):
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import TINY_LLM
    from toollmm.checkpoint import load_checkpoint, save_checkpoint
    from toollmm.config import load_config
    from toollmm.model.toollmm import build_model
    from toollmm.tokenization import load_tokenizer

    config = load_config(3, [TINY_CONFIG], ["model.tuning=lora", f"model.base_check={base_check}"])
    model = build_model(config.model, 32)
    ckpt = save_checkpoint(tmp_path / "checkpoint-1", model, config, load_tokenizer(TINY_LLM), {"step": 1}, "encoder")
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert meta["base_model"]["fingerprint"] == model.base_fingerprint and len(model.base_fingerprint) == 16
    other = tmp_path / "other_base"  # the same architecture, one weight nudged
    shutil.copytree(TINY_LLM, other)
    (weights,) = other.glob("*.safetensors")
    state = load_file(weights)
    name = next(k for k in state if k.endswith("embed_tokens.weight"))
    state[name] = state[name] * 1.01
    save_file(state, weights, metadata={"format": "pt"})
    load_checkpoint(ckpt)  # its own base: fine
    if base_check == "refuse":
        with pytest.raises(ValueError, match=r"whose weights differ from the base at .*other_base \(fingerprint [0-9a-f]{16} vs "
                                             r"[0-9a-f]{16}\), though their shapes agree\. Pass the base it was trained on"):
            load_checkpoint(ckpt, llm_path=str(other))
    else:
        load_checkpoint(ckpt, llm_path=str(other))
        assert "loading it anyway (model.base_check=warn)" in caplog.text


OUTSIDE_CASES = {
    "dot_dot": ("../outside.jpg", "'../outside.jpg' resolves outside"),
    "absolute": ("/etc/passwd", "'/etc/passwd' resolves outside"),
    "deep_dot_dot": ("a/../../outside.jpg", "'a/../../outside.jpg' resolves outside"),
    "link_out": ("link_out.jpg", "'link_out.jpg' resolves outside"),
    "swapped_roles": (None, "conversation roles are ['gpt', 'human']"),
}


@pytest.mark.parametrize("case", sorted(OUTSIDE_CASES))
def test_media_outside_the_root_is_refused_even_when_missing_media_is_kept(tmp_path, case):
    """missing_media=keep (what extract_features reads) keeps rows whose media is absent, never
    one that points outside media_root."""
    from toollmm.data.records import OUTSIDE_ROOT
    from toollmm.data.toolmmbench import read_toolmmbench

    root = tmp_path / "media"
    root.mkdir()
    (tmp_path / "outside.jpg").write_bytes(b"x")
    (root / "inside.jpg").write_bytes(b"x")
    (root / "link_out.jpg").symlink_to(tmp_path / "outside.jpg")
    path, expected = OUTSIDE_CASES[case]
    bad = row("swapped", modality="image", path="inside.jpg") if path is None else row("escape", modality="image", path=path)
    if path is None:
        bad["conversations"] = [{"from": "gpt", "value": "a/tool"}, {"from": "human", "value": "the request"}]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([row("kept", modality="image", path="inside.jpg"),
                                row("absent", modality="image", path="absent.jpg"), bad]))
    records, report = read_toolmmbench(data, root, "keep")
    assert [r.query for r in records] == ["kept", "absent"]
    assert [r.media[0].path.name for r in records] == ["inside.jpg", "absent.jpg"]
    reason = "malformed row" if path is None else OUTSIDE_ROOT
    assert report.skipped == {reason: 1} and expected in report.examples[reason][0]
    assert report.examples[reason][0].startswith("rows.json row 2")

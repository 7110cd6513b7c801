"""Bad inputs across the entry points: each case asserts the exit status and the message (CLIs)
or the counted reason and its note (rows, media). All cases fail in validation, before any
model loads, so the entry points run in this process; the table in the reliability docs is
this file's cases."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, TINY_CONFIG
from test_reliability import png_header, row

MEDIA = DATA / "assets"


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

"""preprocess_dataset.py convert: raw formats → the unified format, the report, splits, determinism."""

import hashlib
import json

import pytest

from conftest import ROOT, DATA, run_entry
from toollmm.cli.preprocess_dataset import main
from toollmm.data import converters
from toollmm.data.converters import FORMATS, PROBLEMS, Example, Input, RowProblem, convert, register
from toollmm.data.split import split_by_query
from toollmm.data.toolmmbench import read_toolmmbench

RAW = ROOT / "tests" / "fixtures" / "raw"
T2X = DATA / "t2x_pairs"

# format → (fixture file, media root, extra arguments)
FIXTURES = {
    "toolmmbench": ("toolmmbench.json", DATA, ["--catalogue", str(RAW / "catalogue.json")]),
    "llava": ("llava.json", DATA, []),
    "alpaca": ("alpaca.json", DATA, []),
    "videochat": ("videochat.json", DATA, []),
    "caption-pairs": ("caption_pairs.json", T2X / "cc3m" / "images", []),
}


def run_convert(fmt, out, *extra, test_fraction="0"):
    name, media_root, fixture_args = FIXTURES[fmt]
    main(["convert", "--format", fmt, "--input", str(RAW / name), "--media-root", str(media_root),
          "--output-dir", str(out), "--max-chars", "200", "--test-fraction", test_fraction, *fixture_args, *extra])
    return (json.loads((out / f).read_text()) for f in ("train.json", "test.json", "report.json"))


def media(modality, path):
    return {"modality": modality, "path": path}


def user(text):
    return {"role": "user", "text": text}


def assistant(text):
    return {"role": "assistant", "text": text}


def unified(id, source, task, media_refs, turns, tools=(), meta=None):
    return {"id": id, "source": source, "task": task, "media": media_refs, "turns": turns,
            "tools": list(tools), "meta": meta or {}}


EXPECTED = {
    "toolmmbench": [
        unified("toolmmbench/0", "toolmmbench:toolmmbench", "tool_selection", [media("audio", "assets/bird_audio.wav")],
                [user("Which bird is singing in this recording?")],
                ["MIT/ast-finetuned-audioset-10-10-0.4593", "superb/hubert-base-superb-ks"],
                {"ambiguity": -1, "input_modality": "audio"}),
        unified("toolmmbench/3", "toolmmbench:toolmmbench", "tool_selection", [],
                [user("Continue this story: once upon a time")], ["gpt2", "distilgpt2"],
                {"ambiguity": -1, "ifambiguity": False, "input_modality": "text", "onetomulti": True}),
    ],
    "llava": [
        unified("llava/0", "llava:llava", "instruction", [media("image", "assets/bird_image.jpg")],
                [user("What bird is this?"), assistant("A small songbird."),
                 user("Where is it sitting?"), assistant("On a thin branch.")], meta={"raw_id": "000000033471"}),
        unified("llava/1", "llava:llava", "instruction", [], [user("Name a prime number."), assistant("7")],
                meta={"raw_id": "text-1"}),
    ],
    "alpaca": [
        unified("alpaca/0", "alpaca:alpaca", "instruction", [],
                [user("Translate the sentence into French.\n\nThe cat sleeps."), assistant("Le chat dort.")]),
        unified("alpaca/1", "alpaca:alpaca", "instruction", [],
                [user("Give three tips for staying healthy."), assistant("Eat well, exercise, sleep enough.")]),
    ],
    "videochat": [
        unified("videochat/0", "videochat:videochat", "instruction", [media("video", "assets/test.mp4")],
                [{"role": "system", "text": "Watch the video carefully and answer."},
                 user("What happens in the video?"), assistant("A test pattern moves across the screen."),
                 user("Is there any sound?"), assistant("The question cannot be answered from the frames alone.")]),
        unified("videochat/1", "videochat:videochat", "instruction", [media("video", "assets/test.mp4")],
                [assistant("A short test clip.")], meta={"end": 2.5, "start": 0.0}),
        unified("videochat/2", "videochat:videochat", "instruction", [media("image", "assets/bird_image.jpg")],
                [user("Describe the image."), assistant("A bird on a branch.")]),
    ],
    "caption-pairs": [
        unified("caption_pairs/0", "caption-pairs:caption_pairs", "caption", [media("image", "001312382.jpg")],
                [assistant("cricket player was named award category and runner - up behind person")],
                meta={"raw_id": "001312382"}),
        unified("caption_pairs/1", "caption-pairs:caption_pairs", "caption", [media("image", "001319946.jpg")],
                [assistant("players wait for a conversion")], meta={"raw_id": "001319946"}),
        unified("caption_pairs/2", "caption-pairs:caption_pairs", "caption", [media("image", "001312382.jpg")],
                [assistant("a cricket player holding an award")], meta={"raw_id": "001312382"}),
    ],
}

# format → (rows, merged rows, problem counts in PROBLEMS order, rows named per problem)
EXPECTED_REPORT = {
    "toolmmbench": (11, 1, [2, 2, 1, 1, 1, 1], {"malformed": [4, 10], "empty_field": [5, 6], "over_length": [9],
                                                "unknown_tool": [8], "missing_media": [7], "duplicate": [2]}),
    "llava": (9, 0, [3, 1, 1, 0, 1, 1], {"malformed": [4, 6, 8], "empty_field": [5], "over_length": [7],
                                         "missing_media": [3], "duplicate": [2]}),
    "alpaca": (6, 0, [1, 1, 1, 0, 0, 1], {"malformed": [2], "empty_field": [3], "over_length": [5], "duplicate": [4]}),
    "videochat": (9, 0, [1, 2, 1, 0, 1, 1], {"malformed": [5], "empty_field": [4, 6], "over_length": [8],
                                             "missing_media": [3], "duplicate": [7]}),
    "caption-pairs": (9, 0, [2, 1, 1, 0, 1, 1], {"malformed": [6, 7], "empty_field": [5], "over_length": [8],
                                                 "missing_media": [4], "duplicate": [3]}),
}


def test_every_format_is_registered():
    assert sorted(FORMATS) == sorted(FIXTURES)


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_good_rows_convert_exactly(fmt, tmp_path):
    train, test, _ = run_convert(fmt, tmp_path)
    assert train == EXPECTED[fmt] and test == []
    assert [Example.from_json(row).to_json() for row in train] == train  # the JSON form round-trips


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_report_counts_every_bad_row(fmt, tmp_path):
    _, _, report = run_convert(fmt, tmp_path)
    rows, merged, counts, named = EXPECTED_REPORT[fmt]
    assert (report["rows"], report["converted"], report["merged_rows"]) == (rows, len(EXPECTED[fmt]), merged)
    assert report["problems"] == dict(zip(PROBLEMS, counts))
    assert report["dropped"] == report["problems"]  # missing media is dropped by default (--missing-media skip)
    assert report["rows"] == report["converted"] + report["merged_rows"] + sum(report["dropped"].values())
    file_name = FIXTURES[fmt][0]
    for problem in PROBLEMS:
        where = [item.split(":")[0] for item in report["problem_examples"][problem]]
        assert where == [f"{file_name} row {i}" for i in named.get(problem, [])], problem
    assert report["settings"]["max_chars"] == 200 and report["settings"]["length_unit"].startswith("characters")


def test_problem_examples_say_what_is_wrong(tmp_path):
    _, _, report = run_convert("llava", tmp_path)
    assert report["problem_examples"]["malformed"][0] == (
        "llava.json row 4: conversations[0] has <image> but the row has no 'image' key")
    assert report["problem_examples"]["missing_media"][0].endswith("coco/train2017/000000000404.jpg")
    _, _, report = run_convert("toolmmbench", tmp_path / "t")
    assert report["problem_examples"]["unknown_tool"] == [
        "toolmmbench.json row 8: ['made-up/not-a-tool'] not in the catalogue"]


def test_without_catalogue_no_tool_is_unknown(tmp_path):
    main(["convert", "--format", "toolmmbench", "--input", str(RAW / "toolmmbench.json"), "--media-root",
          str(DATA), "--output-dir", str(tmp_path), "--test-fraction", "0"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"]["unknown_tool"] == 0 and report["problems"]["over_length"] == 0
    assert report["converted"] == 4  # rows 7 (unknown tool) and 8 (over-long) now convert


def test_missing_media_keep_counts_but_keeps(tmp_path):
    train, _, report = run_convert("caption-pairs", tmp_path, "--missing-media", "keep")
    assert report["problems"]["missing_media"] == 1 and report["dropped"]["missing_media"] == 0
    assert [row["id"] for row in train] == ["caption_pairs/0", "caption_pairs/1", "caption_pairs/2",
                                            "caption_pairs/4"]


def test_missing_media_error_names_the_file_and_the_flag(tmp_path):
    with pytest.raises(converters.MissingMediaError, match=r"999999999\.jpg.*--missing-media"):
        run_convert("caption-pairs", tmp_path, "--missing-media", "error")


def test_two_runs_give_identical_bytes(tmp_path):
    for fmt in FIXTURES:
        digests = []
        for run in ("a", "b"):
            run_convert(fmt, tmp_path / fmt / run, test_fraction="0.5")
            digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in sorted((tmp_path / fmt / run).iterdir())})
        assert digests[0] == digests[1] and sorted(digests[0]) == ["report.json", "test.json", "train.json"]


def test_entry_script_convert_mode_is_reproducible(tmp_path):
    outputs = []
    for run in ("a", "b"):
        run_entry("preprocess_dataset.py", "convert", "--format", "llava", "--input", str(RAW / "llava.json"),
                  "--media-root", str(DATA), "--output-dir", str(tmp_path / run), "--test-fraction", "0.5")
        outputs.append([(tmp_path / run / f).read_bytes() for f in ("train.json", "test.json", "report.json")])
    assert outputs[0] == outputs[1]


def test_split_never_puts_one_request_on_both_sides(tmp_path):
    # 40 images × 3 captions each: every caption of an image is one request and must stay together.
    rows = [{"caption": f"caption {c} of image {i}", "image_name": f"{i}.jpg"} for i in range(40) for c in range(3)]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    for i in range(40):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    main(["convert", "--format", "caption-pairs", "--input", str(tmp_path / "pairs.json"),
          "--output-dir", str(tmp_path / "out"), "--test-fraction", "0.5", "--seed", "3"])
    train, test = (json.loads((tmp_path / "out" / f).read_text()) for f in ("train.json", "test.json"))
    train_images = {row["media"][0]["path"] for row in train}
    test_images = {row["media"][0]["path"] for row in test}
    assert train_images and test_images and not train_images & test_images
    assert len(train) == 3 * len(train_images) and len(test) == 3 * len(test_images)


def test_toolmmbench_split_matches_the_config_split():
    """The same seed and fraction put each request on the same side as --config mode does."""
    path, media_root = DATA / "toolmmbench" / "video_tx2t.json", DATA / "toolmmbench" / "mm_dataset"
    examples, report = convert("toolmmbench", [Input(path, media_root)], missing_media="keep")
    assert report.rows == 224 and report.problems["missing_media"] == 224
    train, test = converters.split_examples(examples, 0.3, 0)
    records, _ = read_toolmmbench(path, media_root, "text_only")
    record_train, record_test = split_by_query(records, 0.3, 0)
    assert {e.request_key for e in train} == {r.request_key for r in record_train}
    assert {e.request_key for e in test} == {r.request_key for r in record_test} != set()


@pytest.mark.parametrize("name, modality, rows, examples, missing", [
    ("cc3m", "image", 20, 20, []),
    ("webvid", "video", 11, 8, ["00225661.mp4", "00007343.mp4", "00070041.mp4"]),  # missing upstream too
    ("audiocap", "audio", 8, 8, []),
])
def test_bundled_caption_pairs(name, modality, rows, examples, missing, tmp_path):
    folder = {"image": "images", "video": "videos", "audio": "audios"}[modality]
    main(["convert", "--format", "caption-pairs", "--input", str(T2X / name / f"{name}.json"),
          "--media-root", str(T2X / name / folder), "--output-dir", str(tmp_path), "--test-fraction", "0.2"])
    train, test, report = (json.loads((tmp_path / f).read_text()) for f in ("train.json", "test.json", "report.json"))
    assert (report["rows"], report["converted"], len(train) + len(test)) == (rows, examples, examples)
    assert report["problems"] == dict.fromkeys(PROBLEMS, 0) | {"missing_media": len(missing)}
    assert [item.rsplit("/", 1)[1] for item in report["problem_examples"]["missing_media"]] == missing
    assert all(row["task"] == "caption" and row["media"][0]["modality"] == modality for row in train + test)


def test_jsonl_input_and_a_broken_line(tmp_path):
    (tmp_path / "rows.jsonl").write_text(
        '{"instruction": "Say hi.", "input": "", "output": "Hi."}\n{"instruction": "broken\n\n'
        '{"instruction": "Say bye.", "output": "Bye."}\n')
    examples, report = convert("alpaca", [Input(tmp_path / "rows.jsonl", tmp_path)])
    assert [e.id for e in examples] == ["rows/0", "rows/2"]
    assert report.problem_examples["malformed"] == ["rows.jsonl row 1: row is a NoneType, not an object"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_row_that_is_not_utf8_is_counted_as_malformed(tmp_path, suffix):
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi."}, {"instruction": "Sag tsch\u00fcss.", "output": "Bye."},
            {"instruction": "Say bye.", "output": "Bye."}]
    encoded = [json.dumps(row, ensure_ascii=False).encode() for row in rows]
    encoded[1] = encoded[1].replace("\u00fc".encode(), b"\xfc")  # Latin-1, not UTF-8
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(b"\n".join(encoded) if suffix == ".jsonl" else b"[" + b",".join(encoded) + b"]")
    examples, report = convert("alpaca", [Input(path, tmp_path)])
    assert [e.id for e in examples] == ["rows/0", "rows/2"]
    assert report.problem_examples["malformed"] == [f"rows{suffix} row 1: row is a NoneType, not an object"]


def test_a_new_format_is_one_registered_reader(tmp_path):
    @register("qa-pairs")
    def read_qa(row, ctx):
        if not row.get("a"):
            raise RowProblem("empty_field", "a is empty")
        return Example(ctx.id, ctx.source, "instruction", (), (("user", row["q"]), ("assistant", row["a"])))

    try:
        (tmp_path / "qa.json").write_text(json.dumps([{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": ""}]))
        examples, report = convert("qa-pairs", [Input(tmp_path / "qa.json", tmp_path)])
        assert [e.turns for e in examples] == [(("user", "2+2?"), ("assistant", "4"))]
        assert report.problems["empty_field"] == 1
    finally:
        del FORMATS["qa-pairs"]


def test_unknown_format_and_bad_file_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="known: .*caption-pairs"):
        convert("sharegpt", [Input(RAW / "llava.json", DATA)])
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list of rows"):
        convert("llava", [Input(tmp_path / "obj.json", tmp_path)])

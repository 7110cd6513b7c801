"""The readers of the published formats count every row they cannot use, naming file and row;
preprocess_dataset.py writes the split a config trains on as ToolMMBench rows that read back
as the same training data."""

import json

import pytest

from conftest import DATA, ROOT
from toollmm.catalogue import describe_tools, read_tool_entries
from toollmm.cli.preprocess_dataset import main
from toollmm.config import load_config
from toollmm.data import load_splits
from toollmm.data.captions import read_caption_file
from toollmm.data.split import group_queries, training_records
from toollmm.data.toolmmbench import read_toolmmbench

RAW = ROOT / "tests" / "fixtures" / "raw"
T2X = DATA / "t2x_pairs"


def test_toolmmbench_rows_become_records_and_bad_rows_are_counted():
    records, report = read_toolmmbench(RAW / "toolmmbench.json", DATA, "skip")
    assert [r.id for r in records] == ["toolmmbench:audio/1"] * 3 + ["toolmmbench:text/2", "toolmmbench:image/7",
                                                                       "toolmmbench:text/8"]
    assert (report.rows, report.used, dict(report.by_modality)) == (11, 6, {"audio": 3, "text": 2, "image": 1})
    assert report.skipped == {"malformed row": 4, "missing media": 1}
    assert [note.split(":")[0] for note in report.examples["malformed row"]] == [
        "toolmmbench.json row 4 (id 3)", "toolmmbench.json row 5 (id 4)", "toolmmbench.json row 6 (id 5)"]
    assert report.examples["missing media"] == [f"toolmmbench.json row 7 (id 6): {DATA / 'assets' / 'no_such_image.jpg'}"]
    first = records[0]
    assert (first.query, first.kind, first.input_modality, first.answer) == (
        "Which bird is singing in this recording?", "tool_selection", "audio", "")
    assert first.media[0].path == DATA / "assets" / "bird_audio.wav" and first.media_keys == ("audio:assets/bird_audio.wav",)


def test_one_training_record_per_tool_and_one_query_per_request():
    records, _ = read_toolmmbench(RAW / "toolmmbench.json", DATA, "skip")
    training = training_records(records)
    assert [(r.id, r.tools) for r in training] == [
        ("toolmmbench:audio/1", ["MIT/ast-finetuned-audioset-10-10-0.4593"]),
        ("toolmmbench:audio/1", ["superb/hubert-base-superb-ks"]), ("toolmmbench:text/2", ["gpt2"]),
        ("toolmmbench:text/2", ["distilgpt2"]), ("toolmmbench:image/7", ["made-up/not-a-tool"]),
        ("toolmmbench:text/8", ["gpt2"])]
    assert training[0].answer == "{'api_name': MIT/ast-finetuned-audioset-10-10-0.4593}\n###"
    assert len(training_records(records, keep_duplicates=True)) == 7  # row 2 repeats row 0
    queries = group_queries(records)
    assert [(q.id, q.tools) for q in queries][:2] == [
        ("toolmmbench:audio/1", ["MIT/ast-finetuned-audioset-10-10-0.4593", "superb/hubert-base-superb-ks"]),
        ("toolmmbench:text/2", ["gpt2", "distilgpt2"])]
    assert records[0].tools == ["MIT/ast-finetuned-audioset-10-10-0.4593"]  # grouping copies, the rows stay


def test_caption_pairs_become_records_and_bad_rows_are_counted():
    records, report = read_caption_file(RAW / "caption_pairs.json", T2X / "cc3m" / "images", "image", need_media=True)
    assert [r.id for r in records] == ["caption_pairs/0", "caption_pairs/1", "caption_pairs/2", "caption_pairs/3",
                                       "caption_pairs/7", "caption_pairs/8"]
    assert (report.rows, report.used, report.skipped) == (9, 6, {"missing media": 1, "malformed row": 2})
    assert report.examples["malformed row"] == ["caption_pairs.json row 5: empty caption",
                                                "caption_pairs.json row 6: empty caption"]
    assert report.examples["missing media"] == [f"caption_pairs.json row 4: {T2X / 'cc3m' / 'images' / '999999999.jpg'}"]
    first = records[0]
    assert (first.kind, first.input_modality, first.output_modality, first.query, first.embedding_name) == (
        "pairs", "image", "text", "", "001312382.jpg.npy")
    assert first.caption == "cricket player was named award category and runner - up behind person"
    assert first.source == str(RAW / "caption_pairs.json")


@pytest.mark.parametrize("name, modality, rows, used, missing", [
    ("cc3m", "image", 20, 20, []),
    ("webvid", "video", 11, 8, ["00225661.mp4", "00007343.mp4", "00070041.mp4"]),  # missing upstream too
    ("audiocap", "audio", 8, 8, []),
])
def test_bundled_caption_pairs(name, modality, rows, used, missing):
    folder = {"image": "images", "video": "videos", "audio": "audios"}[modality]
    records, report = read_caption_file(T2X / name / f"{name}.json", T2X / name / folder, modality, need_media=True)
    assert (report.rows, report.used, len(records)) == (rows, used, used)
    assert report.skipped == ({"missing media": len(missing)} if missing else {})
    assert [note.rsplit("/", 1)[1] for note in report.examples["missing media"]] == missing
    assert all(r.kind == "pairs" and r.media[0].modality == modality and r.media[0].path.is_file() for r in records)


def test_the_written_split_reads_back_as_the_training_data(tmp_path):
    main(["--config", "tiny", "--output-dir", str(tmp_path)])
    config = load_config(3, ["tiny"])
    splits = load_splits(config.data)
    expected_train = [(r.query, r.media_keys, r.tools) for r in training_records(splits.train, config.data.duplicate_rows == "keep")]
    expected_test = [(q.query, q.media_keys, q.tools) for q in group_queries(splits.test)]
    train, report = read_toolmmbench(tmp_path / "train.json", DATA, "keep")
    test, _ = read_toolmmbench(tmp_path / "test.json", DATA, "keep")
    assert report.used == report.rows == len(expected_train) > 0
    assert [(r.query, r.media_keys, r.tools) for r in train] == expected_train
    assert [(q.query, q.media_keys, q.tools) for q in test] == expected_test
    assert json.loads((tmp_path / "catalogue.json").read_text()) == splits.catalogue
    assert read_tool_entries(tmp_path / "tools.jsonl") == describe_tools(splits.catalogue, splits.train)

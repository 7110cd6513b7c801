"""ToolMMBench reading: counts, missing media, malformed rows, the split by query, example expansion."""

import json

import pytest

from conftest import ROOT, DATA
from toollmm.data.split import group_queries, split_by_query, training_records
from toollmm.data.toolmmbench import MissingMediaError, read_toolmmbench, tool_catalogue

BENCH = DATA / "toolmmbench"
SAMPLE = ROOT / "data" / "toolmmbench_sample" / "media_requests.json"


def row(id=1, query="Classify this sound.", tool="MIT/ast-finetuned-audioset-10-10-0.4593", modality="audio", path="a.wav"):
    return {"id": id, "image_path": "", "video_path": "", "audio_path": path if modality == "audio" else "",
            "input_modality": modality,
            "conversations": [{"from": "human", "value": query}, {"from": "gpt", "value": tool}]}


def write(tmp_path, rows):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def test_bundled_files_read_as_published():
    records, report = read_toolmmbench(BENCH / "combined_data.json", BENCH / "mm_dataset", "text_only")
    assert report.rows == report.used == 1917
    assert report.text_only == 1917 - 1161  # every image/audio/video file is absent here
    assert all(r.media == [] for r in records)
    assert sum(len(r.tools) > 1 for r in records) > 0
    catalogue = tool_catalogue(
        records
        + read_toolmmbench(BENCH / "audio_tx2t.json", BENCH, "text_only")[0]
        + read_toolmmbench(BENCH / "video_tx2t.json", BENCH, "text_only")[0]
    )
    assert "unknown" in catalogue and 900 <= len(catalogue) <= 960
    assert all(name == name.strip() for name in catalogue)


def test_missing_media_skipped_and_reported(tmp_path):
    (tmp_path / "present.wav").write_bytes(b"RIFF")
    rows = [row(1, path="present.wav"), row(2, path="gone.wav"), row(3, path="gone2.wav"), row(4, modality="text")]
    records, report = read_toolmmbench(write(tmp_path, rows), tmp_path, "skip")
    assert [r.id for r in records] == ["rows:audio/1", "rows:text/4"]
    assert report.skipped["missing media"] == 2
    assert "gone.wav" in report.examples["missing media"][0] and "id 2" in report.examples["missing media"][0]
    assert "2 skipped: missing media" in report.summary()


def test_missing_media_text_only_keeps_the_row_without_media(tmp_path):
    records, report = read_toolmmbench(write(tmp_path, [row(path="gone.wav")]), tmp_path, "text_only")
    assert len(records) == 1 and records[0].media == [] and records[0].media_keys == ("audio:gone.wav",)
    assert report.text_only == 1 and not report.skipped


def test_missing_media_error_names_file_and_option(tmp_path):
    with pytest.raises(MissingMediaError, match=r"gone\.wav.*missing_media"):
        read_toolmmbench(write(tmp_path, [row(path="gone.wav")]), tmp_path, "error")


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("not a row", "not an object"),
        ({"id": 5}, "'conversations' missing"),
        ({**row(modality="text"), "conversations": [{"from": "human", "value": "  "}, {"value": "x"}]}, "empty or non-string query"),
        ({**row(modality="text"), "conversations": [{"value": "q"}, {"value": 7}]}, "tool"),
        ({**row(modality="text"), "conversations": [{"value": "q"}, {"value": []}]}, "tool"),
        ({**row(modality="text"), "conversations": [{"value": "q"}, {"from": "gpt"}]}, "lacks 'value'"),
        ({**row(), "input_modality": "smell"}, "input_modality"),
        ({**row(), "audio_path": ""}, "'audio_path' is empty"),
    ],
)
def test_malformed_rows_are_counted_with_reason(tmp_path, bad, reason):
    good = row(9, modality="text")
    records, report = read_toolmmbench(write(tmp_path, [bad, good]), tmp_path, "skip")
    assert [r.id for r in records] == ["rows:text/9"]
    assert report.skipped["malformed row"] == 1
    assert reason in report.examples["malformed row"][0] and "row 0" in report.examples["malformed row"][0]


def test_not_a_list_is_a_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_toolmmbench(path, tmp_path)
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_toolmmbench(path, tmp_path)


def test_split_by_query_is_deterministic_and_disjoint():
    records = []
    for name in ("audio_tx2t.json", "video_tx2t.json", "combined_data.json"):
        records += read_toolmmbench(BENCH / name, BENCH, "text_only")[0]
    train, test = split_by_query(records, 0.15, seed=0)
    train2, test2 = split_by_query(list(reversed(records)), 0.15, seed=0)
    assert {r.id for r in test} == {r.id for r in test2}
    assert not {r.request_key for r in train} & {r.request_key for r in test}
    assert 0.08 < len(group_queries(test)) / len(group_queries(records)) < 0.22
    assert {r.id for r in split_by_query(records, 0.15, seed=1)[1]} != {r.id for r in test}


def test_one_example_per_acceptable_tool(tmp_path):
    multi = row(1, modality="text", tool=["a/one", "b/two"])
    repeated = [row(2, modality="text", query="same", tool="c/x"), row(3, modality="text", query="same", tool="d/y"),
                row(4, modality="text", query="same", tool="c/x")]
    records, _ = read_toolmmbench(write(tmp_path, [multi, *repeated]), tmp_path)
    pairs = [(r.query, r.tools, r.answer) for r in training_records(records)]
    assert pairs == [("Classify this sound.", ["a/one"], "{'api_name': a/one}\n###"),
                     ("Classify this sound.", ["b/two"], "{'api_name': b/two}\n###"),
                     ("same", ["c/x"], "{'api_name': c/x}\n###"), ("same", ["d/y"], "{'api_name': d/y}\n###")]
    assert [r.tools for r in records] == [["a/one", "b/two"], ["c/x"], ["d/y"], ["c/x"]]  # the rows read stay as they are
    queries = group_queries(records)
    assert [q.tools for q in queries] == [["a/one", "b/two"], ["c/x", "d/y"]]


def test_sample_rows_use_bundled_media_and_catalogue_tools():
    records, report = read_toolmmbench(SAMPLE, DATA, "error")
    assert report.used == report.rows == 120
    assert {r.input_modality for r in records} == {"image", "audio", "video"}
    assert all(len(r.media) == 1 and r.media[0].path.is_file() for r in records)
    catalogue = set()
    for name in ("audio_tx2t.json", "video_tx2t.json", "combined_data.json"):
        catalogue |= set(tool_catalogue(read_toolmmbench(BENCH / name, BENCH, "text_only")[0]))
    assert {r.tools[0] for r in records} <= catalogue


def test_length_grouped_batches_cover_every_example_once_per_epoch():
    from toollmm.data.dataset import LengthGroupedBatchSampler

    lengths = [(i * 37) % 101 + 1 for i in range(203)]
    ranks = [LengthGroupedBatchSampler(lengths, 4, world_size=2, rank=r, seed=3, group_batches=5) for r in (0, 1)]
    batches = [list(sampler) for sampler in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == 26  # ceil(203 / 8)
    seen = [i for rank in batches for batch in rank for i in batch]
    assert set(seen) == set(range(203)) and len(seen) == 26 * 8  # 5 wrap around to fill the last batch
    padded = sum(max(lengths[i] for i in b) * len(b) for rank in batches for b in rank)
    assert padded / sum(lengths[i] for i in seen) < 1.25  # random batches of 4 here: 1.64 (seed 0)
    assert list(ranks[0]) == batches[0]  # deterministic for a seed and epoch
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != batches[0]


def test_longer_length_groups_pad_less_on_toolmmbench(tokenizer):
    """train.length_group_batches: sorting more global batches together leaves less padding on
    the bundled ToolMMBench pairs at micro-batch 64, most of all in the longest-row batches
    (what the GPU pays for: those batches recompute)."""
    from toollmm.data.dataset import LengthGroupedBatchSampler
    from toollmm.prompts import build_example, format_answer

    records = []
    for name in ("audio_tx2t.json", "video_tx2t.json", "combined_data.json"):
        records += read_toolmmbench(BENCH / name, BENCH, "text_only")[0]
    lengths = [len(build_example(tokenizer, r.query, False, format_answer(r.tools[0]), 512).input_ids)
               for r in training_records(records)]
    whole_epoch = -(-len(lengths) // 64)
    padding, longest = [], []
    for groups in (32, 64, whole_epoch):
        batches = list(LengthGroupedBatchSampler(lengths, 64, seed=0, group_batches=groups))
        padded = sorted((max(lengths[i] for i in b) * len(b), sum(lengths[i] for i in b)) for b in batches)
        padding.append(sum(p for p, _ in padded) / sum(r for _, r in padded))
        longest.append(sum(p for p, _ in padded[-5:]) / sum(r for _, r in padded[-5:]))
    assert padding[0] > padding[1] > padding[2] and padding[2] < 1.03
    assert longest[0] > 1.3 > longest[2]  # the five longest-row batches: mostly padding at 32

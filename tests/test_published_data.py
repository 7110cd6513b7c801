"""The authors' data path: the published mm_dataset/ layout and the multi-dataset epoch."""

import json
import os
import shutil
from collections import Counter

import pytest

from conftest import DATA
from toollmm.config import load_config
from toollmm.data import load_splits
from toollmm.data.dataset import PublishedBatchSampler
from toollmm.data.split import group_queries, training_records
from toollmm.data.toolmmbench import read_toolmmbench, tool_catalogue
from toollmm.prompts import format_answer

BENCH = DATA / "toolmmbench"
ASSET = {"image": DATA / "assets" / "bird_image.jpg", "audio": DATA / "assets" / "bird_audio.wav",
         "video": DATA / "assets" / "test.mp4"}
SUBFOLDER = {"image": "image", "audio": "audio", "video": ""}  # video paths start with video/


def lay_out_mm_dataset(root, files):
    """Every media file the rows name, placed as the authors ship mm_dataset/: hard links to
    one copy of a bundled file per modality (1161 files, no copies of their bytes)."""
    sources = {}
    for modality, asset in ASSET.items():
        sources[modality] = root / f"_bundled{asset.suffix}"
        shutil.copy(asset, sources[modality])
    for name in files:
        for row in json.loads((BENCH / name).read_text()):
            for modality in ASSET:
                value = row.get(f"{modality}_path")
                if value:
                    target = root / "mm_dataset" / SUBFOLDER[modality] / value
                    if not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.link(sources[modality], target)
    return root / "mm_dataset"


def test_published_mm_dataset_layout_reads_every_row(tmp_path):
    files = ["audio_tx2t.json", "video_tx2t.json", "combined_data.json"]
    mm_dataset = lay_out_mm_dataset(tmp_path, files)
    config = load_config(3, overrides=[
        "data.train_files=" + json.dumps([{"path": str(BENCH / n), "media_root": str(mm_dataset), "media_layout": "published"}
                                          for n in files[:2]]),
        "data.eval_files=" + json.dumps([{"path": str(BENCH / files[2]), "media_root": str(mm_dataset),
                                          "media_layout": "published"}]),
        "data.missing_media=error",
    ])
    splits = load_splits(config.data)
    report = splits.report
    assert report.rows == report.used == 2944 + 224 + 1917
    assert not report.skipped and report.text_only == 0
    assert report.by_modality == {"audio": 2944 + 125, "video": 224 + 17, "image": 614, "text": 1161}
    assert "(audio 3069, image 614, text 1161, video 241)" in report.summary()
    assert all(ref.path.is_file() for record in splits.train + splits.test for ref in record.media)
    # The flat rule (media_root/<path>) finds none of the image and audio files of that folder.
    _, flat = read_toolmmbench(BENCH / "combined_data.json", mm_dataset, "skip")
    assert flat.used == 1161 + 17 and flat.skipped["missing media"] == 614 + 125


def epochs(sampler, count):
    out = []
    for epoch in range(count):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_published_sampling_oversamples_the_smaller_file():
    sources = ["a.json"] * 6 + ["b.json"] * 2
    sampler = PublishedBatchSampler(sources, batch_size=2, seed=13)
    first, second = epochs(sampler, 2)
    assert len(sampler) == 6 and sum(len(b) for b in first) == 12
    for batch in first + second:
        assert len({sources[i] for i in batch}) == 1
    # Files alternate, one micro-batch each; the small file is drawn three times an epoch.
    assert [sources[b[0]] for b in first] == ["a.json", "b.json"] * 3
    assert sorted(i for b in first if sources[b[0]] == "a.json" for i in b) == [0, 1, 2, 3, 4, 5]
    assert sorted(i for b in first if sources[b[0]] == "b.json" for i in b) == [6, 6, 6, 7, 7, 7]
    assert epochs(PublishedBatchSampler(sources, batch_size=2, seed=13), 2) == [first, second]
    assert first != second and epochs(PublishedBatchSampler(sources, batch_size=2, seed=14), 1)[0] != first


def test_published_sampling_splits_each_global_batch_across_ranks():
    sources = ["a.json"] * 6 + ["b.json"] * 2
    ranks = [list(PublishedBatchSampler(sources, batch_size=1, world_size=2, rank=r, seed=0)) for r in (0, 1)]
    alone = list(PublishedBatchSampler(sources, batch_size=2, seed=0))
    assert [a + b for a, b in zip(*ranks)] == alone  # rank r takes the r-th share of the same global batch


def test_published_sampling_refuses_a_file_smaller_than_a_global_batch():
    with pytest.raises(ValueError, match="b.json has 2.*data.sampling=shuffled_union"):
        PublishedBatchSampler(["a.json"] * 6 + ["b.json"] * 2, batch_size=3)


def test_repeated_rows_and_tool_names_as_the_original_trains_on_them():
    def pairs(*overrides):
        config = load_config(3, ["tiny"], list(overrides))
        records = load_splits(config.data).train
        return records, [(r, r.tools[0]) for r in training_records(records, config.data.duplicate_rows == "keep")]

    tiny_records, tiny_pairs = pairs()
    # The tiny default: each (query, media, tool) once, names stripped.
    assert all(tool == tool.strip() for _, tool in tiny_pairs)
    records, kept = pairs("data.duplicate_rows=keep", "data.tool_names=verbatim", "data.split.test_fraction=0",
                          "data.train_files=" + json.dumps([{"path": str(BENCH / n)} for n in ("audio_tx2t.json", "video_tx2t.json")]),
                          "data.eval_files=[]")
    by_file = Counter(record.source.rsplit("/", 1)[-1] for record, _ in kept)
    assert by_file == {"audio_tx2t.json": 2944, "video_tx2t.json": 224}
    dropped = Counter(record.source.rsplit("/", 1)[-1] for record in training_records(records))
    assert by_file - dropped == {"audio_tx2t.json": 545, "video_tx2t.json": 8}
    # Verbatim names reach the targets; the catalogue and the evaluation unit strip them.
    records, verbatim = pairs("data.tool_names=verbatim")
    spaced = sorted({tool for _, tool in verbatim if tool != tool.strip()})
    assert spaced and " t5-base" in spaced
    assert format_answer(" t5-base") == "{'api_name':  t5-base}\n###"  # the original's "{'api_name': " + value + "}\n###"
    assert all(t == t.strip() for query in group_queries(records) for t in query.tools)
    assert tool_catalogue(records) == tool_catalogue(tiny_records)


def test_published_epoch_of_the_audio_and_video_files_at_world_size_4():
    from toollmm.engine import planned_steps, warmup_steps

    config = load_config(3)  # stage_3.yaml: micro-batch 4 × accumulation 4, 5 epochs
    sources = ["audio_tx2t.json"] * 2944 + ["video_tx2t.json"] * 224
    ranks = [PublishedBatchSampler(sources, config.train.micro_batch_size, world_size=4, rank=r) for r in range(4)]
    epoch = [batch for sampler in ranks for batch in sampler]
    assert len(ranks[0]) == 368 and len(epoch) * 4 == 5888  # 2944 × 2 samples, half of them video
    assert sum(sources[b[0]] == "video_tx2t.json" for b in epoch) * 4 == 2944
    assert planned_steps(len(sources), config, 4, len(ranks[0])) == 460
    assert planned_steps(len(sources), config, 4) == 5 * (198 // 4)  # each example once an epoch
    assert config.train.warmup_rule == "published" and warmup_steps(0.1, 460, "published") == 46
    assert (warmup_steps(0.1, 50, "published"), warmup_steps(0.1, 50, "ceil"), warmup_steps(0.1, 461, "ceil")) == (10, 5, 47)


def test_feature_extraction_lists_media_in_the_published_layout(tmp_path):
    mm_dataset = lay_out_mm_dataset(tmp_path, ["video_tx2t.json"])
    records, _ = read_toolmmbench(BENCH / "video_tx2t.json", mm_dataset, "keep", "published")  # as extract_features reads
    paths = {ref.path for record in records for ref in record.media}
    assert len(records) == 224 and paths and all(p.is_file() and p.parent == (mm_dataset / "video").resolve() for p in paths)


def test_published_sampling_cannot_also_group_by_length():
    from toollmm.config import ConfigError

    with pytest.raises(ConfigError, match="cannot also group by length: set train.group_by_length=false"):
        load_config(3, ["tiny"], ["data.sampling=published"])
    assert load_config(3, ["tiny"], ["data.sampling=published", "train.group_by_length=false"]).data.sampling == "published"

"""Open-set foundations on the bundled ToolMMBench data: the tool-level split (unseen tools never
reach training), the catalogue file of tool entries (a new tool in it is a constrained answer), and
the TF-IDF text-similarity baseline."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import DATA, TINY_CONFIG, TINY_LLM
from toollmm.catalogue import CatalogueError, ToolEntry, describe_tools, load_catalogue, read_tool_entries, write_tool_entries
from toollmm.checkpoint import save_checkpoint
from toollmm.cli import inference
from toollmm.cli.text_baseline import main as text_baseline
from toollmm.config import ConfigError, load_config
from toollmm.data import load_splits
from toollmm.data.split import pick_unseen_tools, tool_modalities, training_records
from toollmm.model.toollmm import build_model
from toollmm.open_set import TfidfIndex, entry_text, rank_by_text, recall_by_group, words
from toollmm.tokenization import load_tokenizer


def splits_with(*overrides):
    return load_splits(load_config(3, [str(TINY_CONFIG)], list(overrides)).data)


@pytest.fixture(scope="module")
def default_splits():
    return splits_with()


@pytest.fixture(scope="module")
def open_splits():
    return splits_with("data.split.unseen_tools=0.2")


def test_unseen_tools_never_reach_training(open_splits):
    unseen = open_splits.unseen_tools
    assert len(unseen) == 185 and unseen <= set(open_splits.catalogue)
    for record in training_records(open_splits.train, keep_duplicates=True):
        assert record.tools[0].strip() not in unseen
    assert not {r.request_key for r in open_splits.train} & {r.request_key for r in open_splits.test}
    assert len(open_splits.train) == 3644
    tags = Counter(open_splits.tool_split(query) for query in open_splits.test_queries())
    assert tags == {"seen": 376, "unseen": 114}


def test_unseen_tools_are_stratified_by_input_modality(default_splits, open_splits):
    main_modality = tool_modalities(default_splits.train + default_splits.test)
    tools = Counter(main_modality.values())
    held = Counter(main_modality[tool] for tool in open_splits.unseen_tools)
    assert tools == {"text": 652, "image": 186, "audio": 79, "video": 9}
    assert held == {modality: round(0.2 * n) for modality, n in tools.items()} == {"text": 130, "image": 37, "audio": 16, "video": 2}


def test_unseen_tools_depend_on_the_seed_only(default_splits):
    records = default_splits.train + default_splits.test
    first = pick_unseen_tools(records, 0.2, seed=0)
    assert pick_unseen_tools(list(reversed(records)), 0.2, seed=0) == first
    assert pick_unseen_tools(records, 0.2, seed=1) != first
    assert pick_unseen_tools(records, 0.0, seed=0) == frozenset()


def test_no_unseen_tools_leaves_the_split_unchanged(default_splits):
    explicit = splits_with("data.split.unseen_tools=0")
    assert default_splits.unseen_tools == explicit.unseen_tools == frozenset()
    assert [r.id for r in explicit.train] == [r.id for r in default_splits.train]
    assert [r.id for r in explicit.test] == [r.id for r in default_splits.test]
    assert (len(default_splits.train), len(default_splits.test)) == (4363, 842)
    assert {default_splits.tool_split(q) for q in default_splits.test_queries()} == {"seen"}


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_unseen_fraction_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match=rf"data.split.unseen_tools must be in \[0, 1\), got {value}"):
        load_config(3, [str(TINY_CONFIG)], [f"data.split.unseen_tools={value}"])


def test_a_request_that_also_accepts_a_seen_tool_trains_on_it_only():
    from toollmm.data.records import Record
    from toollmm.data.split import hold_out_tools

    both = [Record(id="a1", query="q1", tools=["seen"]), Record(id="a2", query="q1", tools=[" new"])]
    only_new = [Record(id="b1", query="q2", tools=["new"])]
    listed = [Record(id="c1", query="q3", tools=["seen", "new"])]
    train, test = hold_out_tools(both + only_new + listed, [], frozenset({"new"}))
    assert [(r.id, r.tools) for r in train] == [("a1", ["seen"]), ("c1", ["seen"])]
    assert [r.id for r in test] == ["b1"]


def test_bundled_entries_tell_only_what_training_rows_tell(open_splits, tmp_path):
    entries = describe_tools(open_splits.catalogue, open_splits.train)
    by_name = {entry.name: entry for entry in entries}
    assert [entry.name for entry in entries] == open_splits.catalogue
    assert by_name["Salesforce/blip-image-captioning-large"] == ToolEntry(
        name="Salesforce/blip-image-captioning-large", input_modalities=("image",),
        examples=("Write a short caption for this photo.",
                  "For a course project, I need a description of this image. What features can you see in this image?",
                  "I'm sorting through my nature photography and it would be helpful to have descriptions of these "
                  "images to organize them better. Can you help with that?"))
    # unseen tools: the name alone; 10 seen tools only have rows on the test side
    bare = {entry.name for entry in entries if entry.examples == entry.input_modalities == ()}
    assert bare >= open_splits.unseen_tools and len(bare) == 185 + 10
    test_queries = {query.query for query in open_splits.test_queries()}
    train_queries = {record.query for record in open_splits.train}
    assert all(set(entry.examples) <= train_queries for entry in entries)
    assert not {example for entry in entries for example in entry.examples} & test_queries - train_queries
    write_tool_entries(tmp_path / "tools.jsonl", entries)
    assert read_tool_entries(tmp_path / "tools.jsonl") == entries
    assert load_catalogue(tmp_path / "tools.jsonl") == open_splits.catalogue


def test_a_list_of_names_and_a_json_list_of_entries_read(tmp_path):
    (tmp_path / "names.json").write_text('["b/tool", "a/tool"]')
    assert load_catalogue(tmp_path / "names.json") == ["a/tool", "b/tool"]
    (tmp_path / "entries.json").write_text('[{"name": " new/tool ", "task": "depth estimation", "tags": ["depth"], '
                                           '"input_modalities": ["image"], "description": "Predicts depth."}, "b/tool"]')
    assert read_tool_entries(tmp_path / "entries.json") == [
        ToolEntry("new/tool", task="depth estimation", input_modalities=("image",), description="Predicts depth.", tags=("depth",)),
        ToolEntry("b/tool")]


@pytest.mark.parametrize("text, suffix, problem", [
    ('{"name": "a"}\n{"task": "x"}\n', ".jsonl", r"tools.jsonl line 2: 'name' is missing or empty"),
    ('[{"name": "a"}, {"name": " a"}]', ".json", r"tools.json entry 1: duplicate name 'a' \(first at .*tools.json entry 0\)"),
    ('[{"name": "a", "descripton": "x"}]', ".json", r"tools.json entry 0: unknown field 'descripton'; the fields are name, task, "),
    ('[{"name": "a", "tags": "vision"}]', ".json", r"tools.json entry 0 \('a'\): 'tags' must be a list of strings"),
    ('[{"name": "a", "task": 3}]', ".json", r"tools.json entry 0 \('a'\): 'task' is a int; expected a string"),
    ('[{"name": "a", "input_modalities": ["picture"]}]', ".json", r"entry 0 \('a'\): input modality 'picture' is not one of"),
    ('{"name": "a"}\n{"name": "b",}\n', ".jsonl", r"tools.jsonl line 2: not valid JSON"),
    ('{"name": "a"}', ".json", r"tools.json: a JSON dict; expected a list of tool entries"),
    ('[3]', ".json", r"tools.json entry 0: is a int; expected an object with a 'name'"),
    ('[]', ".json", r"tools.json: no tool entries"),
])
def test_malformed_catalogue_files_name_file_entry_and_problem(tmp_path, text, suffix, problem):
    path = tmp_path / f"tools{suffix}"
    path.write_text(text)
    with pytest.raises(CatalogueError, match=problem):
        read_tool_entries(path)


def test_tfidf_weights_and_ranking_by_hand():
    index = TfidfIndex(["speech commands audio", "image captioning", "audio tagging audio"])
    assert list(index.vocabulary) == ["audio", "captioning", "commands", "image", "speech", "tagging"]
    assert index.idf == pytest.approx([math.log(4 / 3) + 1, math.log(2) + 1, math.log(2) + 1, math.log(2) + 1,
                                       math.log(2) + 1, math.log(2) + 1])
    assert np.linalg.norm(index.matrix, axis=1) == pytest.approx([1, 1, 1])
    assert index.rank("which audio command is this", 3) == [2, 0, 1]  # 'command' is not 'commands'
    assert index.rank("speech", 1) == [0]
    assert index.rank("nothing known", 3) == [0, 1, 2]  # all scores 0: document order


def test_entry_text_splits_names_into_words():
    entry = ToolEntry("MIT/ast-finetuned-speech-commands-v2", tags=("keyword",), examples=("Which command?",))
    assert words(entry_text(entry)) == ["mit", "ast", "finetuned", "speech", "commands", "v2", "keyword", "which", "command"]
    entries = [ToolEntry("a/image-captioning"), ToolEntry("b/speech-commands")]
    assert rank_by_text(entries, ["speech commands, please", "caption this image"], k=2) == [
        ["b/speech-commands", "a/image-captioning"], ["a/image-captioning", "b/speech-commands"]]


def test_recall_by_group_counts_any_acceptable_tool_in_the_first_k():
    rankings = [["x", "a", "b"], ["b"], [], [" c", "x", "x", "x", "x", "a"]]
    acceptable = [["a"], ["b ", "z"], ["a"], ["a", "c"]]
    groups = [("all", "seen"), ("all", "seen"), ("all", "unseen"), ("all", "unseen")]
    assert recall_by_group(rankings, acceptable, groups, ks=(1, 2, 5)) == {
        "all": {"queries": 4, "recall@1": 0.5, "recall@2": 0.75, "recall@5": 0.75},
        "seen": {"queries": 2, "recall@1": 0.5, "recall@2": 1.0, "recall@5": 1.0},
        "unseen": {"queries": 2, "recall@1": 0.5, "recall@2": 0.5, "recall@5": 0.5}}


def test_text_baseline_on_the_bundled_split(tmp_path):
    recall = text_baseline(["--config", str(TINY_CONFIG), "--output", str(tmp_path / "report.json"),
                            "data.split.unseen_tools=0.2"])
    hits = {label: (row["queries"], round(row["recall@1"] * row["queries"]), round(row["recall@5"] * row["queries"]))
            for label, row in recall.items()}
    assert hits["seen"] == (376, 109, 176) and hits["unseen"] == (114, 2, 4)
    assert hits["unseen/image"] == (29, 2, 3) and hits["seen/audio"] == (120, 45, 70)
    assert sum(hits[f"unseen/{m}"][0] for m in ("text", "image", "audio", "video")) == 114
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["catalogue_size"] == 926 and len(report["unseen_tools"]) == 185 and report["recall"] == recall


def test_text_baseline_prediction_file_scores_the_same_in_the_evaluation(tmp_path):
    """The baseline written as a prediction file: evaluate.py's seen/unseen recall equals the
    baseline's own, so it can stand beside a model's files in one report."""
    from toollmm.cli import evaluate

    overrides = ["data.split.unseen_tools=0.2"]
    recall = text_baseline(["--config", str(TINY_CONFIG), "--predictions", str(tmp_path / "tfidf.json"), *overrides])
    rows = json.loads((tmp_path / "tfidf.json").read_text())
    assert len(rows) == 490 and all(row["tool"] == row["top_k"][0]["tool"] and len(row["top_k"]) == 5 for row in rows)
    config = load_config(3, [str(TINY_CONFIG)], [f"model.llm_path={TINY_LLM}", *overrides])
    save_checkpoint(tmp_path / "ck", build_model(config.model, 1024).eval(), config, load_tokenizer(TINY_LLM),
                    {"step": 1}, "encoder-id")
    result = evaluate.main(["--ckpt", str(tmp_path / "ck"), "--predictions", str(tmp_path / "tfidf.json"),
                            "--output-dir", str(tmp_path / "eval")])
    by_split = result["metrics"]["top_k_recall"]["by_tool_split"]
    for split in ("seen", "unseen"):
        assert by_split[split]["n"] == recall[split]["queries"]
        assert by_split[split]["recall@1"] == pytest.approx(recall[split]["recall@1"])
        assert by_split[split]["recall@5"] == pytest.approx(recall[split]["recall@5"])
    assert result["metrics"]["by_tool_split"]["unseen"]["accuracy"] == pytest.approx(recall["unseen"]["recall@1"])


def test_text_baseline_reads_a_catalogue_file_and_refuses_a_bad_one(tmp_path):
    write_tool_entries(tmp_path / "tools.jsonl", [ToolEntry("only/tool")])
    recall = text_baseline(["--config", str(TINY_CONFIG), "--catalogue", str(tmp_path / "tools.jsonl")])
    assert recall["all"] == {"queries": 393, "recall@1": 0.0, "recall@5": 0.0}
    (tmp_path / "bad.json").write_text('[{"nme": "x"}]')
    with pytest.raises(SystemExit, match=r"text_baseline: .*bad.json entry 0: unknown field 'nme'"):
        text_baseline(["--config", str(TINY_CONFIG), "--catalogue", str(tmp_path / "bad.json")])


def test_a_new_tool_in_a_catalogue_file_is_selectable_without_retraining(tiny_default, tmp_path):
    """The checkpoint never saw ``acme/brand-new-depth-model``: an entries file adds it, and
    constrained top-k answers rank it beside a trained tool."""
    config = load_config(3, [str(TINY_CONFIG)], [f"model.llm_path={TINY_LLM}", "model.dtype=fp32"])
    config.data.feature_cache_dir = str(tmp_path / "features")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", build_model(config.model, 1024).eval(), config, load_tokenizer(TINY_LLM),
                    {"step": 1}, "encoder-id")
    rows = [row for row in json.loads((DATA / "toolmmbench" / "combined_data.json").read_text())
            if row["input_modality"] == "text"][:2]
    (tmp_path / "queries.json").write_text(json.dumps(rows))
    new = ToolEntry("acme/brand-new-depth-model", task="depth estimation", input_modalities=("image",))
    write_tool_entries(tmp_path / "tools.jsonl", [new, ToolEntry("gpt2")])
    inference.main(["--ckpt", str(tmp_path / "ck"), "--data", str(tmp_path / "queries.json"), "--output",
                    str(tmp_path / "top.json"), "--catalogue", str(tmp_path / "tools.jsonl"),
                    "inference.constrained=true", "inference.top_k=2"])
    answers = json.loads((tmp_path / "top.json").read_text())
    assert len(answers) == 2
    for answer in answers:
        assert answer["tool"] in {new.name, "gpt2"}
        assert sorted(r["tool"] for r in answer["top_k"]) == [new.name, "gpt2"]
        assert all(math.isfinite(r["score"]) for r in answer["top_k"])


def test_split_inference_tags_seen_and_unseen_queries_and_evaluation_reports_them(open_splits, tmp_path):
    """With tools held out, every prediction row says whether its query's tools were seen in
    training, and evaluate.py reports accuracy and recall for seen and unseen side by side."""
    from toollmm.cli import evaluate

    overrides = [f"model.llm_path={TINY_LLM}", "model.dtype=fp32", "data.split.unseen_tools=0.2"]
    config = load_config(3, [str(TINY_CONFIG)], overrides)
    config.data.feature_cache_dir = str(tmp_path / "features")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", build_model(config.model, 1024).eval(), config, load_tokenizer(TINY_LLM),
                    {"step": 1}, "encoder-id")
    output = tmp_path / "test.json"
    inference.main(["--ckpt", str(tmp_path / "ck"), "--split", "test", "--sample", "24", "--output", str(output),
                    "inference.constrained=true", "inference.top_k=2", "inference.max_new_tokens=4"])
    rows = json.loads(output.read_text())
    expected = {query.id: open_splits.tool_split(query) for query in open_splits.test_queries()}
    assert {row["tool_split"] for row in rows} == {"seen", "unseen"}
    assert all(row["tool_split"] == expected[row["question_id"]] for row in rows)
    result = evaluate.main(["--ckpt", str(tmp_path / "ck"), "--predictions", str(output), "--output-dir", str(tmp_path / "eval")])
    counts = Counter(row["tool_split"] for row in rows)
    assert {g: s["n"] for g, s in result["metrics"]["by_tool_split"].items()} == counts
    assert set(result["metrics"]["top_k_recall"]["by_tool_split"]) == {"seen", "unseen"}


def test_closed_set_catalogue_is_the_trained_tools(open_splits, default_splits):
    """``inference.catalogue_tools=trained``: the closed-set baseline's catalogue has no held-out tool."""
    trained = open_splits.catalogue_of("trained")
    assert trained == sorted({record.tools[0].strip() for record in training_records(open_splits.train)})
    assert not set(trained) & open_splits.unseen_tools
    # 926 tools, 185 held out, and 10 more named only by test requests.
    assert len(trained) == 731 and set(trained) < set(open_splits.catalogue_of("all")) - open_splits.unseen_tools
    assert open_splits.catalogue_of("all") == open_splits.catalogue
    assert set(default_splits.catalogue_of("trained")) <= set(default_splits.catalogue)
    with pytest.raises(ValueError, match="'seen' is not one of"):
        open_splits.catalogue_of("seen")

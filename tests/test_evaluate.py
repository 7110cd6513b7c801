import json
import shutil
import struct
from collections import Counter

import pytest

import toollmm.evaluate as evaluate_module
from conftest import DATA, TINY_CONFIG
from toollmm.evaluate import (
    Reference,
    evaluate_predictions,
    format_recall_table,
    format_table,
    load_references,
    most_frequent_tool_baseline,
    normalize_ambiguity,
    normalize_flag,
    write_reports,
)
from toollmm.prompts import format_answer

BENCH = DATA / "toolmmbench"
CATALOGUE = {"MIT/ast", "superb/hubert", "google/vit", "t5-base", "unknown"}


def row(row_id, modality, value, turn_ambiguity=-1, **metadata):
    """A ToolMMBench row; ``metadata`` (ambiguity, ifambiguity, onetomulti) goes on the top level."""
    answer = {"from": "gpt", "value": value}
    if turn_ambiguity is not None:
        answer["ambiguity"] = turn_ambiguity
    return {
        "id": row_id,
        "input_modality": modality,
        "conversations": [{"from": "human", "value": "query", "input_modality": modality}, answer],
        **metadata,
    }


@pytest.fixture
def references():
    return load_references([
        row(1, "text", [" t5-base"]),  # stray space, as in the real data
        row(2, "text", ["t5-base", "google/vit"]),
        row(1, "image", ["google/vit"]),  # same id as a text row: a different question
        row(2, "image", ["google/vit"]),
        row(1, "audio", ["MIT/ast", "superb/hubert"]),
        row(2, "audio", ["MIT/ast"]),
        row(3, "audio", "MIT/ast"),  # training format: one tool name
    ])


def hand_made_predictions():
    return [
        {"question_id": "text/1", "response": "{'api_name': t5-base}\n###"},  # correct
        {"question_id": "text/2", "response": "{'api_name': 'google/vit'}\n###"},  # quoted, correct
        {"question_id": "image/1", "response": "{'api_name': MIT/ast}\n###"},  # wrong, in catalogue
        {"question_id": "image/2", "response": "{'api_name': google/vit-large}\n###"},  # hallucinated
        {"question_id": "audio/1", "response": "I think superb/hubert"},  # format error
        # surrounding whitespace and a following turn after the stop string: correct
        {"question_id": "audio/2", "response": "  {'api_name': MIT/ast}\n### Human: {'api_name': x}"},
        {"question_id": "audio/3", "response": "ignored", "tool": " mit/ast "},  # case differs: hallucinated
    ]


def test_load_references_both_formats(references):
    assert list(references) == ["text/1", "text/2", "image/1", "image/2", "audio/1", "audio/2", "audio/3"]
    assert references["text/1"] == Reference("text/1", ["t5-base"], "text", ambiguity=-1)
    assert references["audio/3"] == Reference("audio/3", ["MIT/ast"], "audio", ambiguity=-1)


def test_hand_made_predictions_exact_numbers(references):
    metrics = evaluate_predictions(hand_made_predictions(), references, CATALOGUE)
    assert metrics["overall"] == {
        "n": 7, "correct": 3, "hallucinated": 2, "format_errors": 1, "missing_predictions": 0,
        "accuracy": 3 / 7, "hallucination_rate": 2 / 7, "format_accuracy": 6 / 7,
    }
    by_modality = metrics["by_modality"]
    assert list(by_modality) == ["text", "image", "audio"]
    assert by_modality["text"] == {
        "n": 2, "correct": 2, "hallucinated": 0, "format_errors": 0, "missing_predictions": 0,
        "accuracy": 1.0, "hallucination_rate": 0.0, "format_accuracy": 1.0,
    }
    assert by_modality["image"] == {
        "n": 2, "correct": 0, "hallucinated": 1, "format_errors": 0, "missing_predictions": 0,
        "accuracy": 0.0, "hallucination_rate": 0.5, "format_accuracy": 1.0,
    }
    assert by_modality["audio"] == {
        "n": 3, "correct": 1, "hallucinated": 1, "format_errors": 1, "missing_predictions": 0,
        "accuracy": 1 / 3, "hallucination_rate": 1 / 3, "format_accuracy": 2 / 3,
    }
    assert metrics["missing_predictions"] == 0


def test_both_answer_rules_are_scored_and_labelled(references):
    predictions = hand_made_predictions()
    metrics = evaluate_predictions(predictions, references, CATALOGUE)
    rules = metrics["answer_rules"]
    assert rules["stop_string"] == {"label": "up to the first \\n### (ours)", **metrics["overall"]}
    # audio/3's response "ignored" is not an answer when read (its tool field is); the rest read alike.
    assert (rules["first_line"]["label"], rules["first_line"]["correct"], rules["first_line"]["format_errors"]) == \
        ("first line (the original's inference.py)", 3, 2)
    predictions[0]["response"] = "{'api_name': t5-base}\nand more"  # a line break before the stop string
    predictions[1]["response"] = "\n{'api_name': google/vit}\n###"  # an empty first line
    rules = evaluate_predictions(predictions, references, CATALOGUE)["answer_rules"]
    assert (rules["stop_string"]["correct"], rules["first_line"]["correct"]) == (2, 2)
    assert (rules["stop_string"]["format_errors"], rules["first_line"]["format_errors"]) == (2, 3)


def test_parsed_tool_none_is_a_format_error(references):
    predictions = [{"question_id": qid, "response": "", "tool": None} for qid in references]
    overall = evaluate_predictions(predictions, references, CATALOGUE)["overall"]
    assert (overall["format_errors"], overall["hallucinated"], overall["accuracy"]) == (7, 0, 0.0)


def test_unknown_and_duplicate_question_ids_raise(references):
    predictions = hand_made_predictions()
    with pytest.raises(ValueError, match="'video/9'"):
        evaluate_predictions(predictions + [{"question_id": "video/9", "response": ""}], references, CATALOGUE)
    with pytest.raises(ValueError, match="more than one prediction.*'text/1'"):
        evaluate_predictions(predictions + predictions[:1], references, CATALOGUE)


def test_missing_predictions_raise_unless_allowed(references):
    predictions = hand_made_predictions()[1:]  # drop text/1, a correct one
    with pytest.raises(ValueError, match="1 references have no prediction.*text/1"):
        evaluate_predictions(predictions, references, CATALOGUE)
    metrics = evaluate_predictions(predictions, references, CATALOGUE, allow_missing=True)
    assert metrics["missing_predictions"] == 1
    assert metrics["overall"]["n"] == 7
    assert metrics["overall"]["accuracy"] == 2 / 7
    assert metrics["overall"]["format_errors"] == 1
    assert metrics["overall"]["format_accuracy"] == 5 / 7
    assert metrics["by_modality"]["text"]["missing_predictions"] == 1


def test_catalogue_must_contain_every_acceptable_tool(references):
    with pytest.raises(ValueError, match="not in the catalogue.*google/vit"):
        evaluate_predictions(hand_made_predictions(), references, CATALOGUE - {"google/vit"})


def test_baseline_picks_most_frequent_with_ties_by_name(references):
    tool, metrics = most_frequent_tool_baseline(
        ["t5-base", "MIT/ast", "google/vit", "t5-base ", "MIT/ast"], references)
    assert tool == "MIT/ast"  # tied with t5-base at 2; "MIT/ast" sorts first
    assert metrics["overall"]["correct"] == 3
    assert metrics["overall"]["hallucinated"] == 0
    assert metrics["overall"]["format_accuracy"] == 1.0
    assert metrics["by_modality"]["audio"]["accuracy"] == 1.0
    assert metrics["by_modality"]["text"]["accuracy"] == 0.0
    with pytest.raises(ValueError):
        most_frequent_tool_baseline([], references)


def test_format_table_without_baseline(references):
    table = format_table(evaluate_predictions(hand_made_predictions(), references, CATALOGUE))
    assert table.splitlines() == [
        "| split | n | accuracy | hallucination rate | format accuracy |",
        "|---|---|---|---|---|",
        "| overall | 7 | 0.429 | 0.286 | 0.857 |",
        "| text | 2 | 1.000 | 0.000 | 1.000 |",
        "| image | 2 | 0.000 | 0.500 | 1.000 |",
        "| audio | 3 | 0.333 | 0.333 | 0.667 |",
    ]


def test_write_reports(references, tmp_path):
    metrics = evaluate_predictions(hand_made_predictions(), references, CATALOGUE)
    _, baseline = most_frequent_tool_baseline(["MIT/ast"], references)
    out_dir = tmp_path / "eval" / "run1"
    json_path, report_path, chart_path = write_reports(metrics, out_dir, "Tiny run", baseline=baseline)

    assert sorted(p.name for p in out_dir.iterdir()) == ["chart.png", "metrics.json", "report.md"]  # no temp files
    assert json.loads(json_path.read_text()) == {
        "title": "Tiny run", "labels": [""], "metrics": metrics, "runs": {"": metrics}, "baseline": baseline,
        "info": {}, "definitions": evaluate_module.DEFINITIONS}
    report = report_path.read_text()
    assert report.startswith("# Tiny run\n")
    assert "| split | n | accuracy | hallucination rate | format accuracy | baseline accuracy |" in report
    assert "| overall | 7 | 0.429 | 0.286 | 0.857 | 0.429 |" in report
    assert "| audio | 3 | 0.333 | 0.333 | 0.667 | 1.000 |" in report
    assert evaluate_module.DEFINITIONS in report

    # Rewriting replaces the files.
    write_reports(metrics, out_dir, "Second title")
    assert json.loads(json_path.read_text())["baseline"] is None
    assert "baseline accuracy" not in report_path.read_text()


@pytest.mark.parametrize("bad_row, problem", [
    ({"id": 7, "input_modality": "text"}, "conversations"),
    ({"id": 7, "input_modality": "text", "conversations": [{"from": "human", "value": "q"}]}, "conversations"),
    ({"id": 7, "input_modality": "text", "conversations": [{"value": "q"}, {"from": "gpt"}]}, "no 'value'"),
    (row(7, "text", 42), "string or a list of strings"),
    (row(7, "text", ["t5-base", None]), "string or a list of strings"),
    (row(7, "text", []), "empty"),
    (row(7, "text", "  "), "empty"),
    ({**row(7, "text", "t5-base"), "input_modality": None}, "input_modality"),
])
def test_malformed_reference_rows(bad_row, problem):
    with pytest.raises(ValueError, match=f"id=7: .*{problem}"):
        load_references([row(1, "text", "t5-base"), bad_row])


def test_malformed_reference_rows_without_id_or_duplicated():
    with pytest.raises(ValueError, match=r"<row 1>.*expected an object"):
        load_references([row(1, "text", "t5-base"), ["not", "a", "row"]])
    with pytest.raises(ValueError, match=r"<row 0>.*missing 'id'"):
        load_references([{"input_modality": "text", "conversations": []}])
    with pytest.raises(ValueError, match="id=1: duplicate question id 'text/1'"):
        load_references([row(1, "text", "t5-base"), row(1, "text", "MIT/ast")])


def test_perfect_predictions_on_bundled_benchmark():
    rows = json.loads((BENCH / "combined_data.json").read_text())
    references = load_references(rows)
    assert len(references) == len(rows) == 1917  # ids repeat across modalities; keys do not
    train_rows = [r for name in ("audio_tx2t.json", "video_tx2t.json")
                  for r in json.loads((BENCH / name).read_text())]
    catalogue = ({t for ref in references.values() for t in ref.acceptable}
                 | {r["conversations"][1]["value"] for r in train_rows})
    # The raw first name, stray spaces included, as a model trained on it would write it.
    predictions = [{"question_id": f"{r['input_modality']}/{r['id']}",
                    "response": format_answer(r["conversations"][1]["value"][0])} for r in rows]

    metrics = evaluate_predictions(predictions, references, catalogue)
    assert {m: s["n"] for m, s in metrics["by_modality"].items()} == {
        "text": 1161, "image": 614, "audio": 125, "video": 17}
    for stats in [metrics["overall"], *metrics["by_modality"].values()]:
        assert stats["accuracy"] == 1.0
        assert stats["hallucination_rate"] == 0.0
        assert stats["format_accuracy"] == 1.0


# --- breakdowns -------------------------------------------------------------------------


def stats(n, correct=0, hallucinated=0, format_errors=0, missing=0):
    return {"n": n, "correct": correct, "hallucinated": hallucinated, "format_errors": format_errors,
            "missing_predictions": missing, "accuracy": correct / n, "hallucination_rate": hallucinated / n,
            "format_accuracy": (n - format_errors - missing) / n}


@pytest.fixture
def references_with_metadata():
    return load_references([
        row(1, "text", [" t5-base"], ambiguity="-1", ifambiguity=False, onetomulti=False),
        row(2, "text", ["t5-base", "google/vit"], ambiguity="4", ifambiguity=True, onetomulti=True),  # "4" as a string
        row(1, "image", ["google/vit"], ambiguity=4, ifambiguity=True, onetomulti=False),  # 4 as a number
        row(2, "image", ["google/vit"], ambiguity=1, ifambiguity=True, onetomulti=False),
        row(1, "audio", ["MIT/ast", "superb/hubert"], ambiguity=-1, ifambiguity=False, onetomulti=True),
        row(2, "audio", ["MIT/ast"]),  # only the answer turn's ambiguity -1: flag and one-to-one derived
        row(3, "audio", "MIT/ast", turn_ambiguity=None),  # nothing: flag and type unknown
    ])


def test_breakdowns_exact_numbers(references_with_metadata):
    # Outcomes (hand_made_predictions): text/1 ✓, text/2 ✓, image/1 ✗, image/2 hallucinated,
    # audio/1 format error, audio/2 ✓, audio/3 hallucinated.
    metrics = evaluate_predictions(hand_made_predictions(), references_with_metadata, CATALOGUE)
    assert metrics["overall"] == stats(7, correct=3, hallucinated=2, format_errors=1)
    assert metrics["by_ambiguity_flag"] == {
        "false": stats(3, correct=2, format_errors=1),  # text/1, audio/1, audio/2 (derived)
        "true": stats(3, correct=1, hallucinated=1),  # text/2, image/1, image/2
        "unknown": stats(1, hallucinated=1),  # audio/3
    }
    assert list(metrics["by_ambiguity_type"]) == ["none", "1", "4", "unknown"]
    assert metrics["by_ambiguity_type"] == {
        "none": stats(3, correct=2, format_errors=1),
        "1": stats(1, hallucinated=1),
        "4": stats(2, correct=1),  # "4" and 4 are one type
        "unknown": stats(1, hallucinated=1),
    }
    assert metrics["by_onetomulti"] == {
        "one-to-one": stats(5, correct=2, hallucinated=2),  # text/1, image/1, image/2, audio/2 and audio/3 (derived)
        "one-to-multi": stats(2, correct=1, format_errors=1),  # text/2, audio/1
    }
    assert metrics["breakdown_sources"] == {
        "ifambiguity": {"derived": 1, "field": 5, "unknown": 1},
        "onetomulti": {"derived": 2, "field": 5},
    }
    assert metrics["top_k_recall"] is None


def test_breakdowns_derived_without_metadata(references):
    # The first fixture's rows carry only the answer turn's ambiguity -1.
    metrics = evaluate_predictions(hand_made_predictions(), references, CATALOGUE)
    assert metrics["by_ambiguity_flag"] == {"false": metrics["overall"]}
    assert metrics["by_ambiguity_type"] == {"none": metrics["overall"]}
    assert metrics["by_onetomulti"] == {
        "one-to-one": stats(5, correct=2, hallucinated=2),  # one acceptable tool each
        "one-to-multi": stats(2, correct=1, format_errors=1),  # text/2, audio/1: two tools
    }
    assert metrics["breakdown_sources"] == {"ifambiguity": {"derived": 7}, "onetomulti": {"derived": 7}}


def test_normalizing_metadata():
    assert [normalize_ambiguity(v) for v in (4, "4", " 4 ", 4.0, "-1", -1, None, "", "lexical")] == [
        4, 4, 4, 4, -1, -1, None, None, "lexical"]
    assert [normalize_flag(v, "f") for v in (True, "True", "false", 1, 0, None)] == [True, True, False, True, False, None]
    for bad in (True, 2.5, [4]):
        with pytest.raises(ValueError, match="ambiguity"):
            normalize_ambiguity(bad)
    with pytest.raises(ValueError, match="question 'text/9': onetomulti must be true or false, got 'maybe'"):
        Reference("text/9", ["t5-base"], "text", onetomulti="maybe")
    with pytest.raises(ValueError, match="id=9: .*ifambiguity"):
        load_references([row(9, "text", "t5-base", ifambiguity="sometimes")])


def test_breakdown_counts_on_bundled_benchmark():
    rows = json.loads((BENCH / "combined_data.json").read_text())
    references = load_references(rows)
    predictions = [{"question_id": f"{r['input_modality']}/{r['id']}", "response": ""} for r in rows]
    catalogue = {t for ref in references.values() for t in ref.acceptable}
    metrics = evaluate_predictions(predictions, references, catalogue)

    # The same counts straight from the file.
    flags = Counter(str(r["ifambiguity"]).lower() for r in rows)
    types = Counter("none" if int(r["ambiguity"]) == -1 else str(int(r["ambiguity"])) for r in rows)
    multi = Counter("one-to-multi" if r["onetomulti"] else "one-to-one" for r in rows)
    assert {k: s["n"] for k, s in metrics["by_ambiguity_flag"].items()} == flags == {"false": 1507, "true": 410}
    assert {k: s["n"] for k, s in metrics["by_ambiguity_type"].items()} == types == {
        "none": 1507, "1": 72, "2": 44, "3": 29, "4": 234, "5": 31}
    assert list(metrics["by_ambiguity_type"]) == ["none", "1", "2", "3", "4", "5"]
    assert {k: s["n"] for k, s in metrics["by_onetomulti"].items()} == multi == {"one-to-one": 556, "one-to-multi": 1361}
    # The file writes ambiguity -1 as the string "-1" on every text row; it is one key with -1.
    assert sum(isinstance(r["ambiguity"], str) for r in rows) == 1161
    # Field and derivation agree on this file: one-to-one rows have exactly one tool.
    assert all((len(r["conversations"][1]["value"]) > 1) == r["onetomulti"] for r in rows)
    assert metrics["breakdown_sources"] == {"ifambiguity": {"field": 1917}, "onetomulti": {"field": 1917}}


# --- top-k recall -----------------------------------------------------------------------


def top(*entries):
    return [{"tool": tool, "score": score} for tool, score in entries]


def predictions_with_top_k():
    top_k = {
        "text/1": top(("google/vit", -1.0), (" t5-base", -2.0), ("MIT/ast", -3.0)),  # hit at rank 2 (stripped)
        "text/2": top(("t5-base", -0.5), ("MIT/ast", -1.0), ("unknown", -2.0)),  # rank 1
        # Not sorted in the file, and a tie: sorted by score, the tie keeps the file's order -> rank 2.
        "image/1": top(("t5-base", -3.0), ("MIT/ast", -1.0), ("google/vit", -1.0)),
        # A duplicate counts once: MIT/ast, t5-base, google/vit -> rank 3 (it would be 4 with the duplicate).
        "image/2": top(("MIT/ast", -1.0), ("MIT/ast ", -1.5), ("t5-base", -2.0), ("google/vit", -3.0)),
        # audio/1: no top_k.
        "audio/2": top(("MIT/ast", 0.0)),  # a shorter list, rank 1
        "audio/3": top(("superb/hubert", -1.0), ("t5-base", -2.0), ("google/vit", -3.0)),  # no hit
    }
    return [{**p, **({"top_k": top_k[p["question_id"]]} if p["question_id"] in top_k else {})}
            for p in hand_made_predictions()]


def test_top_k_recall_exact_numbers(references):
    metrics = evaluate_predictions(predictions_with_top_k(), references, CATALOGUE)
    # The generated answers still decide accuracy.
    assert metrics["overall"] == evaluate_predictions(hand_made_predictions(), references, CATALOGUE)["overall"]
    recall = metrics["top_k_recall"]
    assert recall["k"] == 3  # the most distinct tools in one list
    assert recall["overall"] == {"n": 7, "with_top_k": 6, "recall@1": 2 / 7, "recall@2": 4 / 7, "recall@3": 5 / 7}
    assert recall["by_modality"] == {
        "text": {"n": 2, "with_top_k": 2, "recall@1": 1 / 2, "recall@2": 1.0, "recall@3": 1.0},
        "image": {"n": 2, "with_top_k": 2, "recall@1": 0.0, "recall@2": 1 / 2, "recall@3": 1.0},
        "audio": {"n": 3, "with_top_k": 2, "recall@1": 1 / 3, "recall@2": 1 / 3, "recall@3": 1 / 3},
    }
    assert format_recall_table(metrics).splitlines() == [
        "| split | n | recall@1 | recall@2 | recall@3 |",
        "|---|---|---|---|---|",
        "| overall | 7 | 0.286 | 0.571 | 0.714 |",
        "| text | 2 | 0.500 | 1.000 | 1.000 |",
        "| image | 2 | 0.000 | 0.500 | 1.000 |",
        "| audio | 3 | 0.333 | 0.333 | 0.333 |",
    ]


def test_top_k_recall_with_missing_predictions(references):
    predictions = [p for p in predictions_with_top_k() if p["question_id"] != "text/2"]
    recall = evaluate_predictions(predictions, references, CATALOGUE, allow_missing=True)["top_k_recall"]
    assert recall["overall"] == {"n": 7, "with_top_k": 5, "recall@1": 1 / 7, "recall@2": 3 / 7, "recall@3": 4 / 7}


def test_without_top_k_there_is_no_recall(references):
    metrics = evaluate_predictions(hand_made_predictions(), references, CATALOGUE)
    assert metrics["top_k_recall"] is None
    assert format_recall_table(metrics) is None
    predictions = [{**p, "top_k": None} for p in hand_made_predictions()]  # null counts as absent
    assert evaluate_predictions(predictions, references, CATALOGUE)["top_k_recall"] is None


@pytest.mark.parametrize("top_k", ["t5-base", [{"tool": "t5-base"}], [{"tool": 3, "score": 0.0}],
                                   [{"tool": "t5-base", "score": float("nan")}]])
def test_malformed_top_k_raises(references, top_k):
    predictions = hand_made_predictions()
    predictions[0] = {**predictions[0], "top_k": top_k}
    with pytest.raises(ValueError, match="question 'text/1': top_k"):
        evaluate_predictions(predictions, references, CATALOGUE)


# --- several prediction files side by side ----------------------------------------------


def constrained_predictions():
    # Every answer a catalogue member: 5 correct, 0 hallucinated, all well-formed.
    tools = {"text/1": "t5-base", "text/2": "google/vit", "image/1": "google/vit", "image/2": "MIT/ast",
             "audio/1": "superb/hubert", "audio/2": "MIT/ast", "audio/3": "unknown"}
    return [{**p, "response": format_answer(tools[p["question_id"]]), "tool": tools[p["question_id"]]}
            for p in predictions_with_top_k()]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_side_by_side_report(references_with_metadata, tmp_path):
    runs = {
        "free": evaluate_predictions(hand_made_predictions(), references_with_metadata, CATALOGUE),
        "constrained": evaluate_predictions(constrained_predictions(), references_with_metadata, CATALOGUE),
    }
    assert runs["constrained"]["overall"] == stats(7, correct=5)
    _, baseline = most_frequent_tool_baseline(["MIT/ast"], references_with_metadata)
    json_path, report_path, chart_path = write_reports(runs, tmp_path, "Free vs constrained", baseline,
                                                       info={"baseline_tool": "MIT/ast"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png", "metrics.json", "report.md"]

    payload = json.loads(json_path.read_text())
    assert payload["labels"] == ["free", "constrained"]
    assert payload["runs"] == runs and payload["metrics"] == runs["free"]
    assert payload["baseline"] == baseline and payload["info"] == {"baseline_tool": "MIT/ast"}

    report = report_path.read_text()
    groups = " | ".join(f"{m} ({label})" for label in ("free", "constrained")
                        for m in ("accuracy", "hallucination rate", "format accuracy"))
    header = f"| split | n | {groups} | baseline accuracy |"
    assert report.count(header) == 4  # modality, ambiguity flag, ambiguity type, one-to-one vs one-to-multi
    for line in [
        "| overall | 7 | 0.429 | 0.286 | 0.857 | 0.714 | 0.000 | 1.000 | 0.429 |",
        "| image | 2 | 0.000 | 0.500 | 1.000 | 0.500 | 0.000 | 1.000 | 0.000 |",
        "| true | 3 | 0.333 | 0.333 | 1.000 | 0.667 | 0.000 | 1.000 | 0.000 |",
        "| unknown | 1 | 0.000 | 1.000 | 1.000 | 0.000 | 0.000 | 1.000 | 1.000 |",  # flag and type: audio/3
        "| 4 | 2 | 0.500 | 0.000 | 1.000 | 1.000 | 0.000 | 1.000 | 0.000 |",
        "| one-to-multi | 2 | 0.500 | 0.000 | 0.500 | 1.000 | 0.000 | 1.000 | 0.500 |",
        "| split | n | recall@1 (constrained) | recall@2 (constrained) | recall@3 (constrained) |",
        "| overall | 7 | 0.286 | 0.571 | 0.714 |",
        "No `top_k` in: `free`.",
        "## By ambiguity flag (ifambiguity)",
        "## By ambiguity type",
        "## By one-to-one vs one-to-multi",
        "![chart](chart.png)",
    ]:
        assert line in report.splitlines(), line
    assert evaluate_module.DEFINITIONS in report

    chart = chart_path.read_bytes()
    assert png_size(chart) == (1680, 400)  # four panels: three metrics and recall@k
    assert len(chart) > 20_000


def test_chart_without_top_k_has_three_panels(references, tmp_path):
    metrics = evaluate_predictions(hand_made_predictions(), references, CATALOGUE)
    _, _, chart_path = write_reports(metrics, tmp_path, "One run")
    chart = chart_path.read_bytes()
    assert png_size(chart) == (1260, 400) and len(chart) > 10_000
    assert "No prediction file carries `top_k`" in (tmp_path / "report.md").read_text()


def test_runs_against_different_references_are_refused(references, references_with_metadata):
    free = evaluate_predictions(hand_made_predictions(), references, CATALOGUE)
    fewer = {k: v for k, v in references.items() if k != "text/1"}
    other = evaluate_predictions(hand_made_predictions()[1:], fewer, CATALOGUE)
    with pytest.raises(ValueError, match="different references"):
        format_table({"a": free, "b": other})


# --- the command ------------------------------------------------------------------------


@pytest.fixture
def config_only_checkpoint(tmp_path):
    """The evaluation reads only the checkpoint's config (catalogue and baseline data)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(TINY_CONFIG, ckpt / "config.yaml")
    (ckpt / "checkpoint.json").write_text("{}")
    (ckpt / "trainable.safetensors").write_bytes(b"")
    return ckpt


def inference_rows(predictions, references):
    """Rows as inference.py writes them (metadata from the references)."""
    return [{**p, "acceptable": references[p["question_id"]].acceptable,
             "input_modality": references[p["question_id"]].input_modality,
             "ambiguity": references[p["question_id"]].ambiguity,
             "ifambiguity": references[p["question_id"]].ifambiguity,
             "onetomulti": references[p["question_id"]].onetomulti} for p in predictions]


def test_command_side_by_side(config_only_checkpoint, references_with_metadata, tmp_path, capsys):
    from toollmm.cli.evaluate import main

    free, constrained = tmp_path / "free.json", tmp_path / "constrained.json"
    free.write_text(json.dumps(inference_rows(hand_made_predictions(), references_with_metadata)))
    constrained.write_text(json.dumps(inference_rows(constrained_predictions(), references_with_metadata)))
    out = tmp_path / "eval"
    result = main(["--ckpt", str(config_only_checkpoint), "--predictions", str(free), str(constrained),
                   "--labels", "free", "constrained", "--output-dir", str(out), "--title", "side by side"])
    assert result["runs"]["free"]["by_ambiguity_type"]["4"] == stats(2, correct=1)
    assert result["runs"]["constrained"]["top_k_recall"]["overall"]["recall@3"] == 5 / 7
    assert result["metrics"] == result["runs"]["free"]
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["labels"] == ["free", "constrained"]
    assert payload["metrics"]["overall"]["n"] == 7 and payload["baseline"]["overall"]["n"] == 7
    assert payload["info"]["predictions"] == {"free": str(free), "constrained": str(constrained)}
    assert payload["metrics"]["breakdown_sources"]["ifambiguity"] == {"derived": 1, "field": 5, "unknown": 1}
    assert "| overall | 7 | 0.429 | 0.286 | 0.857 | 0.714 | 0.000 | 1.000 |" in capsys.readouterr().out
    assert png_size((out / "chart.png").read_bytes()) == (1680, 400)


def test_command_refuses_conflicting_files_and_bad_labels(config_only_checkpoint, references, tmp_path):
    from toollmm.cli.evaluate import main

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    rows = inference_rows(hand_made_predictions(), references)
    a.write_text(json.dumps(rows))
    b.write_text(json.dumps([{**rows[0], "acceptable": ["MIT/ast"]}, *rows[1:]]))
    common = ["--ckpt", str(config_only_checkpoint), "--output-dir", str(tmp_path / "eval")]
    with pytest.raises(ValueError, match="question 'text/1' reads .* earlier file"):
        main([*common, "--predictions", str(a), str(b)])
    with pytest.raises(SystemExit):
        main([*common, "--predictions", str(a), str(b), "--labels", "only-one"])
    with pytest.raises(SystemExit):
        main([*common, "--predictions", str(a), str(a)])  # same default label


def test_tool_split_breakdown_and_recall(tmp_path):
    """Questions tagged seen / unseen get their own accuracy rows and recall@k rows, per split
    and per split and modality; the report and the chart show them."""
    references = {
        "q1": Reference("q1", ["a"], "text", tool_split="seen"),
        "q2": Reference("q2", ["b"], "image", tool_split="seen"),
        "q3": Reference("q3", ["c"], "image", tool_split="unseen"),
    }
    top = {"q1": ["a", "b"], "q2": ["a", "b"], "q3": ["a", "b"]}  # q1 at 1, q2 at 2, q3 missed
    predictions = [{"question_id": q, "response": format_answer(tools[0]),
                    "top_k": [{"tool": t, "score": -i} for i, t in enumerate(tools)]} for q, tools in top.items()]
    metrics = evaluate_predictions(predictions, references, {"a", "b", "c"})
    assert {g: s["correct"] for g, s in metrics["by_tool_split"].items()} == {"seen": 1, "unseen": 0}
    recall = metrics["top_k_recall"]
    assert recall["by_tool_split"]["seen"]["recall@1"] == 0.5 and recall["by_tool_split"]["seen"]["recall@2"] == 1.0
    assert recall["by_tool_split"]["unseen"]["recall@2"] == 0.0
    assert list(recall["by_tool_split_modality"]) == ["seen/text", "seen/image", "unseen/image"]
    table = format_recall_table({"model": metrics, "other": metrics})
    assert "| unseen/image | 1 | 0.000 | 0.000 | 0.000 | 0.000 |" in table
    _, report_path, _ = write_reports(metrics, tmp_path, "split")
    assert "## By tool seen or unseen in training" in report_path.read_text()
    # Without tags, no tool-split rows at all.
    untagged = {q: Reference(q, r.acceptable, r.input_modality) for q, r in references.items()}
    plain = evaluate_predictions(predictions, untagged, {"a", "b", "c"})
    assert "by_tool_split" not in plain and "by_tool_split" not in plain["top_k_recall"]


def test_ranked_tools_order_by_score_within_each_ranker():
    """Open-set slots list the retriever's picks after the model's, with similarities that are
    not log-probabilities: they stay after the model's entries, sorted among themselves."""
    from toollmm.evaluate import ranked_tools

    top_k = [{"tool": "b", "score": -3.0}, {"tool": "a", "score": -1.0},
             {"tool": "new2", "score": 0.2, "ranked_by": "retriever"}, {"tool": "new1", "score": 0.7, "ranked_by": "retriever"},
             {"tool": " a", "score": 0.9, "ranked_by": "retriever"}]
    assert ranked_tools(top_k, "q") == ["a", "b", "new1", "new2"]
    assert ranked_tools([{"tool": "x", "score": 1.0, "ranked_by": "retriever"}, {"tool": "y", "score": -2.0}], "q") == ["y", "x"]

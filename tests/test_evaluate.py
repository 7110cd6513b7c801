import json
from pathlib import Path

import pytest

import toollmm.evaluate as evaluate_module
from toollmm.evaluate import (
    Reference,
    evaluate_predictions,
    format_table,
    load_references,
    most_frequent_tool_baseline,
    write_reports,
)
from toollmm.prompts import format_answer

DATA = Path("/work/shared/data/toolmmbench")
CATALOGUE = {"MIT/ast", "superb/hubert", "google/vit", "t5-base", "unknown"}


def row(row_id, modality, value):
    return {
        "id": row_id,
        "input_modality": modality,
        "conversations": [
            {"from": "human", "value": "query", "input_modality": modality},
            {"from": "gpt", "value": value, "ambiguity": -1},
        ],
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
    assert references["text/1"] == Reference("text/1", ["t5-base"], "text")
    assert references["audio/3"] == Reference("audio/3", ["MIT/ast"], "audio")


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
    json_path, report_path = write_reports(metrics, out_dir, "Tiny run", baseline=baseline)

    assert sorted(p.name for p in out_dir.iterdir()) == ["metrics.json", "report.md"]  # no temp files left
    assert json.loads(json_path.read_text()) == {"title": "Tiny run", "metrics": metrics, "baseline": baseline}
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
    rows = json.loads((DATA / "combined_data.json").read_text())
    references = load_references(rows)
    assert len(references) == len(rows) == 1917  # ids repeat across modalities; keys do not
    train_rows = [r for name in ("audio_tx2t.json", "video_tx2t.json")
                  for r in json.loads((DATA / name).read_text())]
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

"""bench/results/headline.json: the current headline figures, one record each, in the schema the
README's table and readers of the results rely on."""

import json
import re

import pytest

from conftest import ROOT

REQUIRED = {"stage3_7b_fast_samples_per_s", "stage3_7b_published_samples_per_s", "original_published_samples_per_s",
            "eval_2397_end_to_end_s", "eval_constrained_queries_per_s", "cpu_tiny_inference_queries_per_s",
            "cpu_main_job_s"}
FIELDS = {"name", "value", "unit", "hardware", "commit", "date", "command", "compared_with"}


@pytest.fixture(scope="module")
def records():
    return json.loads((ROOT / "bench" / "results" / "headline.json").read_text())


def test_every_required_figure_has_one_record(records):
    assert isinstance(records, list)
    names = [record["name"] for record in records]
    assert len(names) == len(set(names)), "a figure is listed twice"
    assert REQUIRED <= set(names), f"missing: {sorted(REQUIRED - set(names))}"


def test_records_follow_the_schema(records):
    for record in records:
        where = record.get("name", record)
        assert set(record) == FIELDS, where
        assert isinstance(record["value"], (int, float)) and not isinstance(record["value"], bool) and record["value"] > 0, where
        for key in ("name", "unit", "hardware", "command"):
            assert isinstance(record[key], str) and record[key].strip(), (where, key)
        assert re.fullmatch(r"[0-9a-f]{7,40}", record["commit"]), where
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"]), where
        compared = record["compared_with"]
        assert compared is None or (set(compared) == {"name", "value"} and isinstance(compared["name"], str)
                                    and isinstance(compared["value"], (int, float))), where

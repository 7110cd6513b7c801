"""A figure just measured, printed beside its headline record (bench/results/headline.json).

    python bench/headline.py eval_2397_end_to_end_s 27.9
    python bench/headline.py stage3_7b_fast_samples_per_s --summary /tmp/speed_out/fast/summary.json
    python bench/headline.py eval_constrained_queries_per_s --log /tmp/eval_speed_out/constrained.log

prints, for instance::

    eval_2397_end_to_end_s: 27.9 s now | headline 28.16 s (0188b9c, one NVIDIA H200 (141 GB), 2026-12-04) | ...

so a benchmark's log carries the figure it is to be read against. ``--summary`` reads the value
from a ``bench/summarize_metrics.py`` summary (its ``samples_per_s_over_span``), ``--log`` from
the last ``answered ... (Q queries/s`` line of an ``inference.py`` log. The bench
scripts call it after each measurement; it never fails a benchmark (an unknown name or a missing
file prints one line saying so and exits 0).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HEADLINE = Path(__file__).resolve().parent / "results" / "headline.json"


def records(path: Path = HEADLINE) -> dict[str, dict]:
    return {record["name"]: record for record in json.loads(Path(path).read_text())}


def comparison_line(name: str, value: float, path: Path = HEADLINE) -> str:
    """``name``'s new ``value`` beside its headline record and the record's own comparison."""
    record = records(path).get(name)
    if record is None:
        return f"{name}: {value:.4g} now | no headline record of that name in {path}"
    unit = record["unit"]
    line = (f"{name}: {value:.4g} {unit} now | headline {record['value']:g} {unit} "
            f"({record['commit']}, {record['hardware']}, {record['date']})")
    ratio = value / record["value"]
    line += f" | now/headline {ratio:.2f}"
    compared = record["compared_with"]
    if compared is not None:
        line += f" | the headline compared with {compared['value']:g} {unit}: {compared['name']}"
    return line


def measured(args) -> float | None:
    """The value to compare: given, or read from ``--summary`` or ``--log``; None when that file
    holds none (a run that did not finish)."""
    if args.summary is not None:
        if not args.summary.is_file():
            return None
        return json.loads(args.summary.read_text())["samples_per_s_over_span"]
    if args.log is not None:
        rates = re.findall(r"\(([0-9.]+) queries/s", args.log.read_text()) if args.log.is_file() else []
        return float(rates[-1]) if rates else None
    return args.value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a record name of bench/results/headline.json")
    parser.add_argument("value", nargs="?", type=float, help="the figure just measured")
    parser.add_argument("--summary", type=Path, help="read the value (samples_per_s_over_span) from this summary.json")
    parser.add_argument("--log", type=Path, help="read the value (queries/s) from this inference.py log")
    parser.add_argument("--headline", type=Path, default=HEADLINE)
    args = parser.parse_args(argv)
    if [args.value, args.summary, args.log].count(None) != 2:
        parser.error("give one of VALUE, --summary, --log")
    value = measured(args)
    if value is None:
        print(f"{args.name}: no figure in {args.summary or args.log} (the run did not finish): nothing to compare")
        return
    print(comparison_line(args.name, value, args.headline))


if __name__ == "__main__":
    main()

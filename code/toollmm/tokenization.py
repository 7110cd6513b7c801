"""Loading the LLM's tokenizer and encoding prompt segments the way the original did.

The original MLLM-Tool used the *slow* LLaMA tokenizer, i.e. sentencepiece itself: every
segment is encoded with sentencepiece's dummy-prefix space. The fast (``tokenizers``)
LLaMA tokenizer of transformers 5 differs on segments that start with spaces (it adds
no extra ``▁`` before existing ones; 546 of the 1917 bundled ToolMMBench evaluation
queries start with a space). So when the checkpoint ships ``tokenizer.model`` we encode
segments with sentencepiece directly, and use the Hugging Face tokenizer for the rest
(special tokens, decoding, checkpoints without a sentencepiece model).
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer, PreTrainedTokenizerBase


class PromptTokenizer:
    """A Hugging Face tokenizer plus exact sentencepiece segment encoding."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, sp_model_file: Path | None):
        self.hf = hf_tokenizer
        self.sp = spm.SentencePieceProcessor(model_file=str(sp_model_file)) if sp_model_file else None
        if self.sp is not None and self.sp.get_piece_size() > len(self.hf):
            raise ValueError(
                f"{sp_model_file} has {self.sp.get_piece_size()} pieces but the tokenizer beside it has "
                f"{len(self.hf)}: the two files come from different tokenizers; re-save the folder."
            )
        if self.hf.pad_token_id is None:
            # As the original: pad with EOS; padded positions are masked by length, not by id.
            self.hf.pad_token = self.hf.eos_token

    def encode(self, text: str) -> list[int]:
        if self.sp is not None:
            return self.sp.encode(text)
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def bos_token_id(self) -> int:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.hf.pad_token_id

    def __len__(self) -> int:
        return len(self.hf)

    def save_pretrained(self, path: Path) -> None:
        self.hf.save_pretrained(path)
        if self.sp is not None:
            (Path(path) / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())


def load_tokenizer(path: str | Path) -> PromptTokenizer:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Tokenizer folder {path} does not exist. Put the LLM checkpoint (config.json, weights, "
            "tokenizer.model / tokenizer.json, tokenizer_config.json) there; see pretrained_checkpoint/README.md."
        )
    hf = AutoTokenizer.from_pretrained(path)
    sp_file = path / "tokenizer.model"
    return PromptTokenizer(hf, sp_file if sp_file.is_file() else None)

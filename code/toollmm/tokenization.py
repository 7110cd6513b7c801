"""Loading the LLM's tokenizer and encoding prompt segments the way the original did.

The original MLLM-Tool used the *slow* LLaMA tokenizer, i.e. sentencepiece itself: every
segment is encoded with sentencepiece's dummy-prefix space. The fast (``tokenizers``)
LLaMA tokenizer of transformers 5 differs on segments that start with spaces (it adds
no extra ``▁`` before existing ones; 546 of the 1917 bundled ToolMMBench evaluation
queries start with a space). So when the checkpoint ships ``tokenizer.model`` we encode
segments with sentencepiece directly, and use the Hugging Face tokenizer for the rest
(special tokens, decoding, checkpoints without a sentencepiece model).

Byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2: ``tokenizer.json`` only) encode each segment
with the Hugging Face tokenizer, without special tokens; they add no prefix space, so a
segment's ids decode back to its text exactly (tests/test_bpe.py). Tokenizers without a BOS
token (Qwen2) start prompts with the first segment.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase


class PromptTokenizer:
    """A Hugging Face tokenizer plus exact segment encoding (sentencepiece's own when the folder has
    ``tokenizer.model``, else the Hugging Face tokenizer's, e.g. byte-level BPE)."""

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
        self._refresh_added()

    def _refresh_added(self) -> None:
        """Tokens added beyond the base vocabulary (the signal tokens)."""
        size = self.sp.get_piece_size() if self.sp is not None else self.hf.vocab_size
        self.added = {token: i for token, i in self.hf.get_added_vocab().items() if i >= size}
        pattern = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
        self._added_split = re.compile(f"({pattern})") if pattern else None

    def add_tokens(self, names: list[str]) -> None:
        self.hf.add_tokens([AddedToken(n, normalized=False, special=False) for n in names])
        self._refresh_added()

    def _encode_text(self, text: str) -> list[int]:
        if self.sp is not None:
            return self.sp.encode(text)
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        """Segment ids. Spaces next to an added token are dropped, as the slow LLaMA tokenizer
        the originals ran did (so ``[IMG0] [IMG1]`` is two consecutive ids); newlines are kept,
        so a run followed by ``\n###`` still ends in the stop string."""
        if self._added_split is None:
            return self._encode_text(text)
        pieces = self._added_split.split(text)  # odd indices: added tokens
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.added[piece])
                continue
            piece = piece.lstrip(" ") if i > 0 else piece
            piece = piece.rstrip(" ") if i < len(pieces) - 1 else piece
            if piece:
                ids += self._encode_text(piece)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    def bos_ids(self) -> list[int]:
        """What a prompt starts with: the BOS token, or nothing for tokenizers without one (Qwen2)."""
        return [] if self.hf.bos_token_id is None else [self.hf.bos_token_id]

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

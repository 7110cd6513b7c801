"""Token-exact prompts against sentencepiece's own encoding of each segment, and label masks."""

import json

import sentencepiece as spm

from conftest import DATA, TINY_LLM
from toollmm.prompts import IGNORE_INDEX, MEDIA_SLOT_ID, build_example, format_answer, parse_answer


def sp():
    return spm.SentencePieceProcessor(model_file=str(TINY_LLM / "tokenizer.model"))


def test_media_prompt_is_token_exact(tokenizer):
    ref = sp()
    query = "What sound is in this clip?"
    answer = format_answer("MIT/ast-finetuned-audioset-10-10-0.4593")
    example = build_example(tokenizer, query, has_media=True, answer=answer, max_tgt_len=512)
    before = ref.encode("### Human: <Img>")
    after = ref.encode(f"</Img> {query}\n### Assistant: ")
    target = ref.encode("{'api_name': MIT/ast-finetuned-audioset-10-10-0.4593}\n###")
    assert example.input_ids == [1] + before + [MEDIA_SLOT_ID] + after + target
    # The slot sits right after "<Img>", at index 1 + len(before).
    assert example.input_ids.index(MEDIA_SLOT_ID) == 1 + len(before)
    assert example.labels == [IGNORE_INDEX] * (2 + len(before) + len(after)) + target
    assert not example.truncated


def test_text_prompt_is_token_exact_including_leading_spaces(tokenizer):
    ref = sp()
    # 546 bundled evaluation queries start with a space: the fast tokenizer alone would differ there.
    rows = json.loads((DATA / "toolmmbench" / "combined_data.json").read_text())
    queries = [r["conversations"][0]["value"] for r in rows if r["conversations"][0]["value"].startswith(" ")][:50]
    assert len(queries) == 50
    for query in queries:
        example = build_example(tokenizer, query, has_media=False, answer=None, max_tgt_len=512)
        assert example.input_ids == [1] + ref.encode("### Human: ") + ref.encode(f"{query}\n### Assistant: ")
        assert set(example.labels) == {IGNORE_INDEX}


def test_truncation_caps_tokens_after_the_slot(tokenizer):
    long_query = "describe " * 300
    example = build_example(tokenizer, long_query, has_media=True, answer=format_answer("unknown"), max_tgt_len=40)
    prefix = 1 + len(sp().encode("### Human: <Img>")) + 1
    assert len(example.input_ids) == prefix + 40
    assert example.truncated
    assert set(example.labels) == {IGNORE_INDEX}  # the answer fell off the end


def test_hf_tokenizer_round_trip_and_bos(tokenizer):
    text = "Line one\n### Assistant: {'api_name': openai/whisper-large-v2}\n###"
    ids = tokenizer.hf(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2
    assert tokenizer.hf.unk_token_id == 0


def test_byte_fallback_covers_unseen_characters(tokenizer):
    text = "ℵ≠🙂"
    ids = tokenizer.encode(text)
    assert tokenizer.hf.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_parse_answer():
    assert parse_answer("{'api_name': facebook/detr-resnet-50}\n###") == "facebook/detr-resnet-50"
    assert parse_answer("  {'api_name': 'unknown'}\n### Human: next") == "unknown"
    assert parse_answer("{'api_name': }\n###") is None
    assert parse_answer("facebook/detr-resnet-50") is None
    assert parse_answer("{'api_name': a}{'api_name': b}") is None

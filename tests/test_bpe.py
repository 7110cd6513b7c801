"""Prompts, the stop string, signal tokens and constrained decoding with a byte-level BPE tokenizer
(SmolLM2's, 49152 tokens, no sentencepiece model): the same exactness as with LLaMA's."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StopStringCriteria

from conftest import DATA
from toollmm.catalogue import AnswerTrie
from toollmm.config import OutputsConfig, load_config
from toollmm.data import load_splits
from toollmm.generate import cut_at_stop, generate_responses
from toollmm.model.toollmm import ToolLMM
from toollmm.prompts import IGNORE_INDEX, MEDIA_SLOT_ID, STOP_STRING, build_example, format_answer, parse_answer
from toollmm.signal_tokens import add_signal_tokens

from conftest import TINY_CONFIG


def bundled_rows() -> list[dict]:
    files = sorted((DATA / "toolmmbench").glob("*.json")) + [DATA / "toolmmbench_sample" / "media_requests.json"]
    return [row for path in files for row in json.loads(path.read_text())]


@pytest.fixture(scope="module")
def catalogue():
    return load_splits(load_config(3, [TINY_CONFIG]).data).catalogue


def test_every_bundled_query_and_tool_round_trips(bpe_tokenizer, catalogue):
    assert bpe_tokenizer.sp is None and len(bpe_tokenizer) == 49152
    rows = bundled_rows()
    queries = {row["conversations"][0]["value"] for row in rows}
    assert len(queries) == 2154 and any(q.startswith(" ") for q in queries)
    texts = sorted(queries) + catalogue + [format_answer(tool) for tool in catalogue]
    wrong = [t for t in texts if bpe_tokenizer.decode(bpe_tokenizer.encode(t)) != t]
    assert wrong == []


def test_prompt_segments_decode_to_the_published_prompt(bpe_tokenizer):
    hf = bpe_tokenizer.hf
    query, tool = " What is in this clip?", "MIT/ast-finetuned-audioset-10-10-0.4593"
    example = build_example(bpe_tokenizer, query, has_media=True, answer=format_answer(tool), max_tgt_len=512)
    slot = example.input_ids.index(MEDIA_SLOT_ID)
    assert example.input_ids[0] == hf.bos_token_id == 1  # <|im_start|>
    assert hf.decode(example.input_ids[1:slot]) == "### Human: <Img>"
    body = example.input_ids[slot + 1 :]
    answer = [i for i, label in zip(body, example.labels[slot + 1 :]) if label != IGNORE_INDEX]
    assert hf.decode(body) == f"</Img> {query}\n### Assistant: {format_answer(tool)}"
    assert hf.decode(answer) == "{'api_name': MIT/ast-finetuned-audioset-10-10-0.4593}\n###"
    assert body[-len(answer) :] == answer  # the labels are the answer's tokens, at its end
    text = build_example(bpe_tokenizer, query, has_media=False, answer=None, max_tgt_len=512)
    assert hf.decode(text.input_ids, skip_special_tokens=False) == f"<|im_start|>### Human: {query}\n### Assistant: "


def test_stop_string_is_detected_where_the_answer_ends(bpe_tokenizer, catalogue):
    criteria = StopStringCriteria(bpe_tokenizer.hf, [STOP_STRING])
    for tool in catalogue:
        ids = bpe_tokenizer.encode(format_answer(tool))
        stops = [bool(criteria(torch.tensor([ids[:n]]), None)[0]) for n in range(1, len(ids) + 1)]
        assert stops == [False] * (len(ids) - 1) + [True], tool
        assert cut_at_stop(bpe_tokenizer.decode(ids + bpe_tokenizer.encode(" Human: next"))) == format_answer(tool)


def test_signal_tokens_split_from_the_text_around_them(bpe_tokenizer):
    tokenizer = copy.deepcopy(bpe_tokenizer)
    signal = add_signal_tokens(tokenizer, OutputsConfig(enabled=True))
    assert signal.base_vocab_size == 49152 and signal.ids["image"] == [49154, 49155, 49156, 49157]
    ids = tokenizer.encode("Here it is [IMG0] [IMG1] [IMG2] [IMG3]\n###")
    assert ids == tokenizer.encode("Here it is") + signal.ids["image"] + tokenizer.encode("\n###")
    assert tokenizer.encode("<Img>x</Img>") == [49152] + tokenizer.encode("x") + [49153]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "Here it is[IMG0][IMG1][IMG2][IMG3]\n###"


def test_trie_paths_are_exactly_the_catalogue_answers(bpe_tokenizer, catalogue):
    trie = AnswerTrie(bpe_tokenizer, catalogue)
    assert len(trie) == len(catalogue) == 926
    for tool, ids in zip(trie.tools, trie.sequences):
        assert trie.tool_for(ids) == tool
        assert bpe_tokenizer.decode(ids) == format_answer(tool) and parse_answer(bpe_tokenizer.decode(ids)) == tool
    assert bpe_tokenizer.decode(trie.common_prefix) == "{'api_name':"


def test_constrained_answers_are_catalogue_names(bpe_tokenizer, catalogue):
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2))
    model = ToolLMM(llm, torch.nn.Linear(8, 64)).eval()
    trie = AnswerTrie(bpe_tokenizer, catalogue)
    queries = [row["conversations"][0]["value"] for row in bundled_rows()[::500]]
    prompts = [torch.tensor(build_example(bpe_tokenizer, q, False, None, 512).input_ids) for q in queries]
    answers = generate_responses(model, bpe_tokenizer, prompts, [None] * len(prompts), batch_size=4, show_progress=False,
                                 constraint=trie, temperature=1.0)
    tools = [parse_answer(a) for a in answers]
    assert all(tool in catalogue for tool in tools) and [format_answer(t) for t in tools] == answers
    assert len(set(tools)) > 1  # sampled: different paths of the trie, each a whole name

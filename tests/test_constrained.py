"""Constrained decoding over the tool catalogue, exact catalogue scoring and top-k, on the
untrained tiny LLaMA (LoRA with random B, so every answer is a guess)."""

import json

import pytest
import torch
from transformers import LogitsProcessorList

from conftest import DATA, TINY_CONFIG, TINY_LLM
from toollmm.catalogue import AnswerTrie, TrieLogitsProcessor
from toollmm.config import load_config
from toollmm.data import load_splits
from toollmm.generate import (_batches, beam_top_k, cut_at_stop, generate_responses, left_pad, rank_tools,
                              score_catalogue, top_k_tools)
from toollmm.model.toollmm import build_model
from toollmm.prompts import STOP_STRING, build_example, format_answer, parse_answer

ENCODER_DIM = 1024
QUERIES = [  # (query, has media): lengths differ, so batches are left padded
    ("Please transcribe this.", False),
    ("What objects are in this picture and where are they?", True),
    ("Hi", False),
    ("Translate 'good morning' into German for me, please.", False),
    ("Describe the sound.", True),
]


def tiny_config(tuning="lora"):
    return load_config(3, [TINY_CONFIG], [f"model.llm_path={TINY_LLM}", f"model.tuning={tuning}", "model.dtype=fp32"])


@pytest.fixture(scope="module")
def model(tiny_default):
    torch.manual_seed(0)
    model = build_model(tiny_config().model, ENCODER_DIM)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.eval()


@pytest.fixture(scope="module")
def catalogue(tiny_default):
    return load_splits(tiny_config().data).catalogue


@pytest.fixture(scope="module")
def small_trie(tokenizer, catalogue):
    # Every 19th name (50 of them) plus short and one-token-apart names.
    names = sorted(set(catalogue[::19]) | {"unknown", "gpt2", "distilgpt2"})
    return AnswerTrie(tokenizer, names)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    torch.manual_seed(1)
    ids = [torch.tensor(build_example(tokenizer, q, media, None, 512).input_ids) for q, media in QUERIES]
    features = [torch.randn(ENCODER_DIM) if media else None for _, media in QUERIES]
    return ids, features


def leaf_paths(trie, node=0, path=()):
    if node in trie.tool_at:
        yield path, trie.tools[trie.tool_at[node]]
    for token, child in trie.children[node].items():
        yield from leaf_paths(trie, child, path + (token,))


def test_trie_holds_exactly_the_catalogue(tokenizer, catalogue):
    assert len(catalogue) > 900 and "unknown" in catalogue
    trie = AnswerTrie(tokenizer, catalogue)
    answers = {tuple(tokenizer.encode(format_answer(t))): t for t in catalogue}
    assert dict(leaf_paths(trie)) == answers  # every name reachable, and nothing else
    for ids, tool in list(answers.items())[::50]:
        assert trie.tool_for(list(ids) + [tokenizer.eos_token_id] * 3) == tool  # padding after the leaf is ignored
        with pytest.raises(ValueError, match="do not spell a whole catalogue answer"):
            trie.tool_for(ids[:-1])
    prefix = trie.common_prefix
    assert tokenizer.decode(prefix).startswith("{'api_name':") and all(ids[: len(prefix)] == tuple(prefix) for ids in answers)
    assert list(trie.children[0]) == prefix[:1]
    assert trie.max_length == max(map(len, answers))
    with pytest.raises(KeyError):
        trie.walk(prefix + [tokenizer.eos_token_id])


def test_trie_refuses_ambiguous_catalogues(tokenizer):
    with pytest.raises(ValueError, match="tokenize to the same answer"):
        AnswerTrie(tokenizer, ["gpt2", "gpt2"])
    with pytest.raises(ValueError, match="catalogue is empty"):
        AnswerTrie(tokenizer, [])
    with pytest.raises(ValueError, match=r"Tool names \[' gpt2', 'a}b'\] would not read back"):
        AnswerTrie(tokenizer, [" gpt2", "a}b", "unknown"])


def test_decided_nodes_hold_one_answer(tokenizer, catalogue):
    """only_answer, decision_length and tool_decided_by against the answers' token lists."""
    trie = AnswerTrie(tokenizer, catalogue)
    below = {}  # node -> tools whose answer passes through it
    for tool, ids in zip(trie.tools, trie.sequences):
        node = 0
        for token in [None] + ids:
            node = node if token is None else trie.children[node][token]
            below.setdefault(node, []).append(tool)
    assert len(below) == len(trie.children)
    assert all((trie.only_answer[n] >= 0) == (len(tools) == 1) for n, tools in below.items())
    assert all(trie.tools[trie.only_answer[n]] == tools[0] for n, tools in below.items() if len(tools) == 1)
    decided_at = []  # per answer: tokens until its node holds only it
    for tool, ids in zip(trie.tools, trie.sequences):
        depth = next(d for d in range(len(ids) + 1) if trie.only_answer[trie.walk(ids[:d])] >= 0)
        decided_at.append(depth)
        assert trie.tool_decided_by(ids[:depth] + [tokenizer.eos_token_id, 0]) == tool  # padding after it is ignored
        assert trie.tool_decided_by(ids) == tool
        if depth > 0:
            with pytest.raises(ValueError, match="do not decide a catalogue answer"):
                trie.tool_decided_by(ids[: depth - 1])
    prefix = trie.common_prefix
    assert trie.decision_length(prefix) == max(decided_at) - len(prefix) < trie.max_length - len(prefix)
    assert trie.decision_length() == max(decided_at)
    single = AnswerTrie(tokenizer, ["gpt2"])  # one tool: decided before any token
    assert single.decision_length() == 0 and single.tool_decided_by([]) == "gpt2"


def reference_trie_scores(trie, eos, input_ids, scores, stop_when_decided=False):
    """The processor's rule, row by row in Python, from ``AnswerTrie.walk`` and the children."""
    out = torch.full_like(scores, float("-inf"))
    for row, tokens in enumerate(input_ids.tolist()):
        node = trie.walk(tokens, stop_when_decided)
        if node in trie.tool_at or (stop_when_decided and trie.only_answer[node] >= 0):
            out[row, eos] = 0.0
        else:
            allowed = list(trie.children[node])
            out[row, allowed] = scores[row, allowed]
    return out


def test_processor_matches_a_per_row_walk(tokenizer, catalogue):
    """Rows at every depth of the full catalogue's trie (root, the 900-way branch, mid-answer,
    at a leaf, past a leaf with EOS padding), batched: the tensor walk masks as the Python one."""
    trie = AnswerTrie(tokenizer, catalogue)
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(0)
    for steps in range(trie.max_length + 3):
        rows = []
        for index in torch.randperm(len(trie), generator=generator)[:40].tolist():
            ids = trie.sequences[index]
            if steps > len(ids) or torch.rand(1, generator=generator) < 0.3:
                ids = ids + [eos] * max(0, steps - len(ids))  # finished, padded with EOS
            if len(ids) >= steps:
                rows.append(ids[:steps])
        input_ids = torch.tensor(rows, dtype=torch.long).view(len(rows), steps)
        scores = torch.randn(len(rows), len(tokenizer), generator=generator)
        processed = TrieLogitsProcessor(trie, eos)(input_ids, scores)
        reference = reference_trie_scores(trie, eos, input_ids, scores)
        assert torch.equal(processed, reference), steps
        decided = TrieLogitsProcessor(trie, eos, stop_when_decided=True)(input_ids, scores)
        assert torch.equal(decided, reference_trie_scores(trie, eos, input_ids, scores, stop_when_decided=True)), steps
        prefix = trie.common_prefix  # the same rows with their common head fed as the prompt
        if steps >= len(prefix):
            after_prefix = TrieLogitsProcessor(trie, eos, answer_prefix=prefix)(input_ids[:, len(prefix) :], scores)
            assert torch.equal(after_prefix, reference), steps
    off_path = torch.tensor([trie.common_prefix + [eos]])
    with pytest.raises(ValueError, match="left the answer trie"):
        TrieLogitsProcessor(trie, eos)(off_path, torch.zeros(1, len(tokenizer)))


def greedy_with_processor(model, tokenizer, prompts, processor, max_new_tokens, do_sample=False):
    """Plain greedy (or, with ``do_sample``, sampled) ``generate`` over all prompts in one left-padded
    batch, with one logits processor and no stop string: the new tokens of each row."""
    ids, features = prompts
    input_ids, mask = left_pad(ids, tokenizer.pad_token_id)
    embeds = model.embed_inputs(input_ids, torch.stack([f for f in features if f is not None]))
    with torch.no_grad():
        return model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, top_k=None, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, logits_processor=LogitsProcessorList([processor]))


def test_processor_sees_only_generated_tokens(model, tokenizer, prompts, small_trie):
    """generate with inputs_embeds and left padding: the hook gets (rows, 0) first, then the new tokens."""
    seen = []

    class Recording(TrieLogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(input_ids.clone())
            return super().__call__(input_ids, scores)

    ids, _ = prompts
    out = greedy_with_processor(model, tokenizer, prompts, Recording(small_trie, tokenizer.eos_token_id), small_trie.max_length + 1)
    assert [tuple(s.shape) for s in seen] == [(len(ids), t) for t in range(len(seen))]
    assert all(torch.equal(s, out[:, : s.shape[1]]) for s in seen)
    for row in out.tolist():  # without the stop string, the forced EOS ends each answer
        tool = small_trie.tool_for(row)
        n = len(tokenizer.encode(format_answer(tool)))
        assert row[:n] == tokenizer.encode(format_answer(tool)) and set(row[n:]) <= {tokenizer.eos_token_id}


def test_constrained_answers_equal_decoding_from_the_trie_root(model, tokenizer, prompts, catalogue):
    """generate_responses feeds the answers' common prefix with the prompt: the greedy answers are
    those of decoding every answer token, the prefix's forced tokens included."""
    ids, features = prompts
    trie = AnswerTrie(tokenizer, catalogue)
    assert len(trie.common_prefix) >= 3
    out = greedy_with_processor(model, tokenizer, prompts, TrieLogitsProcessor(trie, tokenizer.eos_token_id), trie.max_length + 1)
    expected = [format_answer(trie.tool_for(row)) for row in out.tolist()]
    assert generate_responses(model, tokenizer, ids, features, batch_size=len(ids), show_progress=False,
                              constraint=trie) == expected


@pytest.mark.parametrize("sample", [False, True])
def test_stopping_when_decided_keeps_the_answers(model, tokenizer, prompts, catalogue, sample):
    """EOS where one answer remains gives the tool that decoding every forced token spells, greedy or
    sampled (one batch, same seed: the steps before the stop draw the same numbers), in fewer steps."""
    trie = AnswerTrie(tokenizer, catalogue)
    eos = tokenizer.eos_token_id
    runs = {}
    for stop in (False, True):
        torch.manual_seed(3)
        processor = TrieLogitsProcessor(trie, eos, stop_when_decided=stop)
        steps = trie.decision_length() + 1 if stop else trie.max_length + 1
        runs[stop] = greedy_with_processor(model, tokenizer, prompts, processor, steps, do_sample=sample).tolist()
    full = [trie.tool_for(row) for row in runs[False]]
    assert [trie.tool_decided_by(row) for row in runs[True]] == full
    assert len(set(full)) > 1
    spelt = [row.index(eos) for row in runs[True]]  # some answers are decided only at their last token
    assert all(short[:n] == whole[:n] and n <= whole.index(eos) for short, whole, n in zip(runs[True], runs[False], spelt))
    assert sum(spelt) < sum(row.index(eos) for row in runs[False])


def test_constrained_answers_are_catalogue_members_batched_as_alone(model, tokenizer, prompts, small_trie):
    ids, features = prompts
    batched = generate_responses(model, tokenizer, ids, features, batch_size=len(ids), show_progress=False,
                                 constraint=small_trie)
    single = [generate_responses(model, tokenizer, [p], [f], batch_size=1, show_progress=False, constraint=small_trie)[0]
              for p, f in zip(ids, features)]
    assert batched == single
    assert all(parse_answer(r) in small_trie.tools and r == format_answer(parse_answer(r)) for r in batched)
    free = generate_responses(model, tokenizer, ids, features, batch_size=len(ids), max_new_tokens=24, show_progress=False)
    assert not any(parse_answer(r) in small_trie.tools for r in free)  # an untrained model does not find them freely


def test_constrained_on_the_full_catalogue(model, tokenizer, prompts, catalogue):
    ids, features = prompts
    trie = AnswerTrie(tokenizer, catalogue)
    responses = generate_responses(model, tokenizer, ids[:3], features[:3], batch_size=3, show_progress=False, constraint=trie)
    assert all(parse_answer(r) in set(catalogue) for r in responses)
    sampled = generate_responses(model, tokenizer, ids[:3], features[:3], batch_size=3, temperature=1.0, show_progress=False,
                                 constraint=trie)
    assert all(parse_answer(r) in set(catalogue) for r in sampled)


@torch.no_grad()
def free_generation_before_constraints(model, tokenizer, prompts, features, batch_size, max_new_tokens):
    """generate_responses as it was before constrained decoding existed (greedy), kept to pin the off switch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id)
        batch_features = [features[i] for i in batch if features[i] is not None]
        embeds = model.embed_inputs(input_ids, torch.stack(batch_features) if batch_features else None)
        output = model.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                    stop_strings=[STOP_STRING], tokenizer=tokenizer.hf, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, top_k=None, do_sample=False)
        for i, ids in zip(batch, output):
            responses[i] = cut_at_stop(tokenizer.decode(ids.tolist(), skip_special_tokens=True))
    return responses


def test_constraint_off_is_the_free_generation(model, tokenizer, prompts):
    ids, features = prompts
    expected = free_generation_before_constraints(model, tokenizer, ids, features, 2, 16)
    assert generate_responses(model, tokenizer, ids, features, batch_size=2, max_new_tokens=16, show_progress=False) == expected
    assert generate_responses(model, tokenizer, ids, features, batch_size=2, max_new_tokens=16, show_progress=False,
                              constraint=None) == expected


def brute_force_scores(model, tokenizer, prompt, feature, tools):
    """log p(answer | prompt) per tool from a plain forward pass over prompt + answer (no cache, no left padding)."""
    answers = [tokenizer.encode(format_answer(t)) for t in tools]
    rows = [torch.cat([prompt, torch.tensor(a)]) for a in answers]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)  # right padding
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    slots = feature.expand(len(rows), -1) if feature is not None else None
    with torch.no_grad():
        logp = model(ids, mask, slot_features=slots)["logits"].log_softmax(-1)
    n = len(prompt)
    return torch.stack([logp[r, n - 1 + torch.arange(len(a)), torch.tensor(a)].sum() for r, a in enumerate(answers)])


def test_exact_scores_equal_a_plain_forward_pass(model, tokenizer, prompts, small_trie):
    ids, features = prompts
    # Batches of 2 (left padded) and 16 rows per forward: several answer chunks per batch.
    scores = score_catalogue(model, tokenizer, ids, features, small_trie, batch_size=2, rows_per_forward=16, show_progress=False)
    assert scores.shape == (len(ids), len(small_trie))
    for i in (0, 1, 4):
        expected = brute_force_scores(model, tokenizer, ids[i], features[i], small_trie.tools)
        torch.testing.assert_close(scores[i], expected, rtol=1e-4, atol=1e-4)


def test_top_k_is_distinct_sorted_and_beats_greedy(model, tokenizer, prompts, small_trie):
    ids, features = prompts
    scores = score_catalogue(model, tokenizer, ids, features, small_trie, show_progress=False)
    top = rank_tools(scores, small_trie, 5)
    greedy = generate_responses(model, tokenizer, ids, features, batch_size=len(ids), show_progress=False, constraint=small_trie)
    for row, scored, response in zip(top, scores, greedy):
        tools = [r["tool"] for r in row]
        values = [r["score"] for r in row]
        assert len(set(tools)) == 5 and set(tools) <= set(small_trie.tools)
        assert values == sorted(values, reverse=True) and values[0] == pytest.approx(scored.max().item())
        # Greedy need not find the most probable answer, but it cannot beat it.
        assert values[0] >= scored[small_trie.tools.index(parse_answer(response))].item()
    normalized = rank_tools(scores, small_trie, 3, length_normalize=True)
    lengths = torch.tensor([len(s) for s in small_trie.sequences])
    assert [r["tool"] for r in normalized[0]] == [small_trie.tools[t] for t in (scores[0] / lengths).topk(3).indices]


def test_beam_top_k(model, tokenizer, prompts, small_trie):
    ids, features = prompts
    exact = score_catalogue(model, tokenizer, ids, features, small_trie, show_progress=False)
    beams = beam_top_k(model, tokenizer, ids, features, small_trie, 5, batch_size=len(ids), show_progress=False)
    for row, scored in zip(beams, exact):
        tools = [r["tool"] for r in row]
        assert len(set(tools)) == 5 and [r["score"] for r in row] == sorted((r["score"] for r in row), reverse=True)
        # Each beam's score is the exact log p(answer | prompt) of its tool.
        torch.testing.assert_close(torch.tensor([r["score"] for r in row]),
                                   scored[[small_trie.tools.index(t) for t in tools]], rtol=1e-4, atol=1e-4)
    # As many beams as answers: no path is pruned, so beam search is exact.
    few = AnswerTrie(tokenizer, small_trie.tools[::4])
    wide = beam_top_k(model, tokenizer, ids[:2], features[:2], few, 5, num_beams=len(few), show_progress=False)
    exact_few = score_catalogue(model, tokenizer, ids[:2], features[:2], few, show_progress=False)
    assert [[r["tool"] for r in row] for row in wide] == [[r["tool"] for r in row] for row in rank_tools(exact_few, few, 5)]


def test_beam_top_k_runs_each_prompt_once(model, tokenizer, prompts, small_trie, monkeypatch):
    """The prompts are prefilled once (one row each, all but their last token); every later
    forward of the search feeds one token per beam."""
    ids, features = prompts
    shapes = []
    forward = type(model.causal_lm()).forward

    def recording(self, *args, **kwargs):
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        shapes.append(tuple(inputs.shape[:2]))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model.causal_lm()), "forward", recording)
    beam_top_k(model, tokenizer, ids, features, small_trie, 3, batch_size=len(ids) * 6, num_beams=6, show_progress=False)
    longest = max(len(p) for p in ids)
    assert shapes[0] == (len(ids), longest - 1)
    assert len(shapes) > 2 and set(shapes[1:]) == {(len(ids) * 6, 1)}
    # batch_size counts rows, prompts × beams: 17 rows hold 2 prompts of 6 beams.
    shapes.clear()
    beam_top_k(model, tokenizer, ids, features, small_trie, 3, batch_size=17, num_beams=6, show_progress=False)
    assert [rows for rows, length in shapes if length > 1] == [2, 2, 1]
    assert {rows for rows, length in shapes if length == 1} == {12, 6}


def test_top_k_tools_is_exact_scoring_or_beam_search(model, tokenizer, prompts, small_trie):
    ids, features = prompts
    exact = top_k_tools(model, tokenizer, ids, features, small_trie, 3, "exact", show_progress=False)
    assert exact == rank_tools(score_catalogue(model, tokenizer, ids, features, small_trie, show_progress=False), small_trie, 3)
    beam = top_k_tools(model, tokenizer, ids, features, small_trie, 3, "beam", batch_size=2, num_beams=8, show_progress=False)
    assert beam == beam_top_k(model, tokenizer, ids, features, small_trie, 3, 2, num_beams=8, show_progress=False)
    with pytest.raises(ValueError, match=r"top-k method 'greedy' is not one of \['exact', 'beam'\]"):
        top_k_tools(model, tokenizer, ids, features, small_trie, 3, "greedy")


def test_inference_cli_constrained_with_top_k(model, tokenizer, tmp_path):
    from toollmm.checkpoint import save_checkpoint
    from toollmm.cli import inference

    config = tiny_config()
    config.data.feature_cache_dir = str(tmp_path / "features")
    save_checkpoint(tmp_path / "ck", model, config, tokenizer, {"step": 1}, "encoder-id")
    rows = json.loads((DATA / "toolmmbench" / "combined_data.json").read_text())[:3]
    (tmp_path / "queries.json").write_text(json.dumps(rows))
    names = sorted({"unknown", "gpt2", *[t for row in rows for t in row["conversations"][1]["value"]]})
    (tmp_path / "catalogue.json").write_text(json.dumps(names))
    common = ["--ckpt", str(tmp_path / "ck"), "--data", str(tmp_path / "queries.json")]
    inference.main([*common, "--output", str(tmp_path / "free.json"), "inference.max_new_tokens=8"])
    inference.main([*common, "inference.constrained=true", "--output", str(tmp_path / "top.json"), "inference.top_k=3",
                    "--catalogue", str(tmp_path / "catalogue.json")])
    for override, refusal in [("inference.num_beams=4", "inference.num_beams applies to inference.top_k > 1"),
                              ("inference.batchsize=8", "unknown config key inference.batchsize; allowed here: attn_implementation, batch_size"),
                              ("train.epochs=2", "override train.epochs: inference takes inference.<key>=VALUE")]:
        with pytest.raises(SystemExit, match=f"^inference: {refusal}"):
            inference.main([*common, "--output", str(tmp_path / "x.json"), override])
    assert not (tmp_path / "x.json").exists()
    free = json.loads((tmp_path / "free.json").read_text())
    assert "top_k" not in free[0] and all(r["tool"] not in names for r in free)
    top = json.loads((tmp_path / "top.json").read_text())
    assert len(top) == 3
    for row in top:
        assert row["tool"] in names and row["response"] == format_answer(row["tool"])
        assert [set(r) for r in row["top_k"]] == [{"tool", "score"}] * 3 and {r["tool"] for r in row["top_k"]} <= set(names)


def test_beam_top_k_with_more_beams_than_answers(model, tokenizer, prompts):
    trie = AnswerTrie(tokenizer, ["gpt2", "distilgpt2", "unknown"])
    ids, features = prompts
    exact = rank_tools(score_catalogue(model, tokenizer, ids[:2], features[:2], trie, show_progress=False), trie, 3)
    beams = beam_top_k(model, tokenizer, ids[:2], features[:2], trie, 3, num_beams=8, show_progress=False)
    assert [[r["tool"] for r in row] for row in beams] == [[r["tool"] for r in row] for row in exact]


def test_static_cache_answers_as_the_dynamic_one(model, tokenizer, prompts, small_trie):
    """inference.cache=static (preallocated, written in place) decodes the same tokens, free and
    constrained, under left padding."""
    ids, features = prompts
    for constraint in (None, small_trie):
        dynamic = generate_responses(model, tokenizer, ids, features, batch_size=len(ids), max_new_tokens=12,
                                     show_progress=False, constraint=constraint, cache="dynamic")
        static = generate_responses(model, tokenizer, ids, features, batch_size=len(ids), max_new_tokens=12,
                                    show_progress=False, constraint=constraint, cache="static")
        assert static == dynamic


def test_static_cache_fits_each_call_not_the_longest_before(model, tokenizer, prompts):
    """transformers sizes a static cache to the longest of all earlier generate calls on the model
    (to spare compiled steps a recompile): after one long prompt, every later batch would carry a
    cache that long, past inference.max_batch_tokens. Uncompiled, each call sizes its own."""
    ids, features = prompts
    lengths = []

    def record_cache_length(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs.get("inputs_embeds") is not None:  # the prefill: one a call
            lengths.append(cache.layers[0].max_cache_len)

    handle = model.causal_lm().register_forward_pre_hook(record_cache_length, with_kwargs=True)
    try:
        long_prompt = torch.cat([ids[0]] * 6)
        for batch in ([long_prompt], [ids[0]]):
            generate_responses(model, tokenizer, batch, [None], batch_size=1, max_new_tokens=4,
                               show_progress=False, cache="static")
    finally:
        handle.remove()
    assert lengths == [len(long_prompt) + 3, len(ids[0]) + 3]  # the last new token is never fed back


def test_batches_cap_the_kv_cache_tokens():
    """inference.max_batch_tokens: rows × (longest prompt + new tokens) stays under the cap (a
    prompt longer than the cap goes alone), every prompt once, shortest first."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 120, (300,), generator=generator).tolist() + [500]
    prompts = [torch.zeros(n, dtype=torch.long) for n in lengths]
    batches = _batches(prompts, batch_size=64, max_tokens=2048, new_tokens=10)
    assert sorted(i for batch in batches for i in batch) == list(range(len(prompts)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 64 and (len(batch) == 1 or len(batch) * (longest + 10) <= 2048)
    assert batches[-1] == [300]  # 510 tokens: over a quarter of the cap, alone at the end
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(flat)
    assert _batches(prompts, batch_size=64) == [sorted(range(301), key=lambda i: lengths[i])[i : i + 64] for i in range(0, 301, 64)]


def test_capped_batches_answer_as_uncapped(model, tokenizer, prompts):
    ids, features = prompts
    uncapped = generate_responses(model, tokenizer, ids, features, batch_size=len(ids), max_new_tokens=10, show_progress=False)
    capped = generate_responses(model, tokenizer, ids, features, batch_size=len(ids), max_new_tokens=10, show_progress=False,
                                max_batch_tokens=60)
    assert capped == uncapped

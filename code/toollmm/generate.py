"""Batched answer generation: left padding, KV cache, greedy by default, per-sequence stop on ``\\n###``.

Three ways to answer, all batched:

- ``generate_responses``: free generation (the original's behaviour), or, given an
  ``AnswerTrie``, constrained generation whose answer is always a catalogue member.
- ``score_catalogue``: exact ``log p(answer | prompt)`` of every catalogue answer (the
  prompt runs once; its KV cache is reused for the answers in chunks). Top-k reference.
- ``beam_top_k``: beam search over the trie, an approximation of the same top-k.

``top_k_tools`` picks between the last two (``inference.top_k_method``).
"""

from __future__ import annotations

import copy

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm
from transformers import LogitsProcessorList

from toollmm.catalogue import AnswerTrie, TrieLogitsProcessor
from toollmm.model.toollmm import ToolLMM
from toollmm.prompts import STOP_STRING, format_answer
from toollmm.tokenization import PromptTokenizer

TOP_K_METHODS = ("exact", "beam")


def left_pad(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    flipped = pad_sequence([s.flip(0) for s in sequences], batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(s) for s in sequences])
    mask = torch.arange(flipped.shape[1])[None, :] < lengths[:, None]
    return flipped.flip(1), mask.flip(1).long()


def cut_at_stop(text: str) -> str:
    """The response up to and including the first stop string (what the model answered)."""
    index = text.find(STOP_STRING)
    return text if index < 0 else text[: index + len(STOP_STRING)]


def _batches(prompts: list[torch.Tensor], batch_size: int, max_tokens: int | None = None,
             new_tokens: int = 0) -> list[list[int]]:
    """Prompt indices batched by length, so little compute goes to padding: at most
    ``batch_size`` prompts, and with ``max_tokens``, at most that many padded tokens of KV cache
    (rows × (longest prompt + ``new_tokens``)), so a batch of long prompts stays in memory."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches, batch = [], []
    for i in order:
        tokens = (len(batch) + 1) * (len(prompts[i]) + new_tokens)  # sorted: prompt i is the longest so far
        if batch and (len(batch) == batch_size or (max_tokens is not None and tokens > max_tokens)):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


def _embed_batch(model: ToolLMM, prompts, features, batch, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, attention_mask = left_pad([prompts[i] for i in batch], pad_id)
    batch_features = [features[i] for i in batch if features[i] is not None]
    slot_features = torch.stack(batch_features).to(device) if batch_features else None
    return model.embed_inputs(input_ids.to(device), slot_features), attention_mask.to(device)


@torch.no_grad()
def generate_responses(
    model: ToolLMM,
    tokenizer: PromptTokenizer,
    prompts: list[torch.Tensor],
    features: list[torch.Tensor | None],
    batch_size: int = 16,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    show_progress: bool = True,
    constraint: AnswerTrie | None = None,
    cache: str = "static",
    compile: bool = False,
    max_batch_tokens: int | None = None,
) -> list[str]:
    """One response per prompt (token ids with media slots), in input order.

    Each sequence stops at its own ``\\n###``; sequences that finish early are padded while
    the rest go on. With ``constraint``, only paths of the answer trie can be generated
    (greedy or sampled among them); the response is then ``format_answer(tool)`` of the
    tool reached. A row stops as soon as its answer is decided (one catalogue answer left
    below its trie node: the rest would be forced tokens), and ``max_new_tokens`` is the most
    such steps plus one (EOS), since a cut answer would be no answer (the answers' common
    prefix goes in with the prompt).
    ``cache``, ``compile`` and ``max_batch_tokens``: see ``InferenceConfig``.
    """
    device = next(model.parameters()).device
    responses: list[str] = [""] * len(prompts)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    forced: list[int] = []
    if constraint is not None:
        # Every answer opens with the trie's common prefix ("{'api_name': "), one allowed token a
        # step: fed with the prompt, it costs part of one prefill instead of a decoding step of the
        # whole batch per token (5 with a 32000-token vocabulary), and the answers are the same.
        forced = constraint.common_prefix
        prompts = [torch.cat([p, torch.tensor(forced, dtype=p.dtype)]) for p in prompts]
        # Stopping where the answer is decided spares the batch's forced tail: a step of the whole
        # batch each, for as long as its longest answer (at most 24 steps instead of 38 on the
        # bundled catalogue), and the static KV cache shrinks with max_new_tokens.
        max_new_tokens = constraint.decision_length(forced) + 1
        sampling["logits_processor"] = LogitsProcessorList(
            [TrieLogitsProcessor(constraint, tokenizer.eos_token_id, answer_prefix=forced, stop_when_decided=True)])
    batches = _batches(prompts, batch_size, max_batch_tokens, max_new_tokens)
    if cache == "static" and not compile:
        # transformers sizes a static cache to the longest of every earlier call on the model (so a
        # compiled step is not recompiled): one long prompt would make every later batch of a
        # long-lived model (the demo, a benchmark's next setting) that long, past max_batch_tokens.
        vars(model.causal_lm()).pop("_previous_max_cache_length", None)
    for batch in tqdm(batches, desc="generate", disable=not show_progress, leave=False):
        embeds, attention_mask = _embed_batch(model, prompts, features, batch, tokenizer.pad_token_id, device)
        output = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            # Constrained rows end with the trie's EOS (before the stop string, once decided):
            # the stop-string check would only add its per-step work.
            stop_strings=None if constraint is not None else [STOP_STRING],
            tokenizer=tokenizer.hf,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            top_k=None,
            cache_implementation=None if cache == "dynamic" else cache,
            disable_compile=not compile,
            **sampling,
        )
        # With inputs_embeds and no input_ids, generate returns only the new tokens.
        for i, ids in zip(batch, output):
            if constraint is not None:
                responses[i] = format_answer(constraint.tool_decided_by(forced + ids.tolist()))
            else:
                responses[i] = cut_at_stop(tokenizer.decode(ids.tolist(), skip_special_tokens=True))
    return responses


@torch.no_grad()
def score_catalogue(
    model: ToolLMM,
    tokenizer: PromptTokenizer,
    prompts: list[torch.Tensor],
    features: list[torch.Tensor | None],
    trie: AnswerTrie,
    batch_size: int = 4,
    rows_per_forward: int = 256,
    show_progress: bool = True,
) -> torch.Tensor:
    """Exact ``log p(answer_t | prompt)`` for every prompt and catalogue tool ``t``.

    Returns float32 ``(len(prompts), len(trie))`` on CPU, columns in ``trie.tools`` order;
    the sum covers every answer token, ``{'api_name': `` through ``}\\n###`` (the suffix
    tells ``image`` from ``image-caption``). Each prompt plus the answers' common prefix runs
    once; its KV cache is repeated for ``rows_per_forward // batch_size`` answers at a time
    (the repeated cache costs rows × prompt tokens of KV memory: lower ``rows_per_forward``
    on a large model).
    """
    device = next(model.parameters()).device
    prefix = trie.common_prefix
    rests = [ids[len(prefix) :] for ids in trie.sequences]  # never empty
    by_length = sorted(range(len(trie)), key=lambda t: len(rests[t]))
    prefix_ids = torch.tensor(prefix, dtype=torch.long)
    scores = torch.empty(len(prompts), len(trie))
    for batch in tqdm(_batches(prompts, batch_size), desc="score", disable=not show_progress, leave=False):
        extended = [torch.cat([prompts[i], prefix_ids.to(prompts[i].dtype)]) for i in batch]
        n = len(batch)
        embeds, mask = _embed_batch(model, extended, [features[i] for i in batch], range(n), tokenizer.pad_token_id, device)
        # Positions as generate computes them under left padding.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=len(prefix) + 1)
        logp = out.logits.float().log_softmax(-1)  # (n, P+1, V): predicts prefix[0..P-1], then each answer's next token
        prefix_lp = logp[:, :-1].gather(-1, prefix_ids.to(device)[None, :, None].expand(n, -1, 1)).sum((1, 2))
        first_lp = logp[:, -1]
        cache, next_position = out.cache, mask.sum(-1)
        del out, logp
        per_chunk = max(1, rows_per_forward // n)
        batch_scores = torch.empty(n, len(trie), device=device)
        for start in range(0, len(trie), per_chunk):
            chunk = by_length[start : start + per_chunk]
            c = len(chunk)
            first = torch.tensor([rests[t][0] for t in chunk], device=device)
            chunk_scores = prefix_lp[:, None] + first_lp[:, first]
            width = len(rests[chunk[-1]]) - 1  # sorted by length: the last is the longest
            if width > 0:
                # Answer tokens 0..L-2 go in, tokens 1..L-1 are scored; right padding is never
                # attended to by earlier positions, so it needs no mask.
                inputs = torch.full((c, width), tokenizer.pad_token_id, dtype=torch.long)
                targets = torch.zeros((c, width), dtype=torch.long)
                valid = torch.zeros((c, width), dtype=torch.bool)
                for j, t in enumerate(chunk):
                    rest = rests[t]
                    inputs[j, : len(rest) - 1] = torch.tensor(rest[:-1])
                    targets[j, : len(rest) - 1] = torch.tensor(rest[1:])
                    valid[j, : len(rest) - 1] = True
                inputs, targets, valid = (x.to(device).repeat(n, 1) for x in (inputs, targets, valid))  # row b*c + j
                chunk_cache = copy.deepcopy(cache)
                chunk_cache.batch_repeat_interleave(c)
                attention = torch.cat([mask.repeat_interleave(c, 0), torch.ones_like(inputs)], dim=1)
                position = next_position.repeat_interleave(c)[:, None] + torch.arange(width, device=device)
                logits = model.llm(input_ids=inputs, attention_mask=attention, position_ids=position,
                                   cache=chunk_cache, use_cache=True).logits.float()
                token_lp = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
                chunk_scores = chunk_scores + (token_lp * valid).sum(-1).view(n, c)
                del logits, chunk_cache
            batch_scores[:, chunk] = chunk_scores
        scores[batch] = batch_scores.cpu()
    return scores


def rank_tools(scores: torch.Tensor, trie: AnswerTrie, k: int, length_normalize: bool = False) -> list[list[dict]]:
    """The ``k`` best tools per row of ``score_catalogue``'s output, as ``{"tool", "score"}`` sorted by score.

    ``length_normalize`` ranks by the mean log-prob per answer token instead of the sum.
    """
    if length_normalize:
        scores = scores / torch.tensor([len(ids) for ids in trie.sequences], dtype=scores.dtype)
    values, indices = scores.topk(min(k, len(trie)), dim=-1)
    return [[{"tool": trie.tools[t], "score": v} for v, t in zip(vs, ts)] for vs, ts in zip(values.tolist(), indices.tolist())]


@torch.no_grad()
def beam_top_k(
    model: ToolLMM,
    tokenizer: PromptTokenizer,
    prompts: list[torch.Tensor],
    features: list[torch.Tensor | None],
    trie: AnswerTrie,
    k: int,
    batch_size: int = 160,
    num_beams: int | None = None,
    show_progress: bool = True,
) -> list[list[dict]]:
    """Beam search over the trie: the best k finished beams per prompt, k distinct tools (fewer
    only if the search finished fewer) with their ``log p(answer | prompt)``, sorted by it.

    ``batch_size`` counts rows, prompts × beams (at least one prompt a batch): the KV cache, and
    the copies of it that each step's beam reordering makes, grow with the rows. On the tiny
    default (2-core CPU, 128 test queries, 10 beams) 64 prompts a batch took 17.7-18.7 s, 6 took
    9.5-11.3 s and 16 took 7.8-8.8 s, with the same tools.

    Each returned score is exact for its tool (the trailing EOS is forced at probability 1,
    and ``length_penalty=0`` keeps plain sums); the set is an approximation of the true top
    k, since beam search may prune a path that would have ended best. ``num_beams`` (default
    2k) trades time for recall: on the trained tiny default (64 test queries, k=5) beams
    recovered 90% of the exact top 5 with k beams, 99.4% with 2k and 100% with 4k, at
    about 1/35, 1/20 and 1/9 of exact scoring's time on CPU.
    """
    device = next(model.parameters()).device
    k = min(k, len(trie))
    num_beams = max(k, num_beams or 2 * k)
    results: list[list[dict]] = [[] for _ in prompts]
    processor = LogitsProcessorList([TrieLogitsProcessor(trie, tokenizer.eos_token_id)])
    for batch in tqdm(_batches(prompts, max(1, batch_size // num_beams)), desc="beam", disable=not show_progress, leave=False):
        embeds, attention_mask = _embed_batch(model, prompts, features, batch, tokenizer.pad_token_id, device)
        # Each prompt runs once: generate would copy it num_beams times before its prefill (10 copies
        # of ~56 tokens at k=5, as many tokens as the whole search decodes). The cache of all but
        # the last prompt token is copied per beam instead, and generate starts from it.
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        cache = model.llm(inputs_embeds=embeds[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1],
                          use_cache=True, logits_to_keep=1).cache
        cache.batch_repeat_interleave(num_beams)  # row i*num_beams + b, as generate expands the prompts
        output = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            cache=cache,
            max_new_tokens=trie.max_length + 1,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            do_sample=False,
            length_penalty=0.0,
            logits_processor=processor,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            top_k=None,
            return_dict_in_generate=True,
            output_scores=True,
        )
        sequences = output.sequences.view(len(batch), num_beams, -1).tolist()
        beam_scores = output.sequences_scores.view(len(batch), num_beams).tolist()
        for i, rows, values in zip(batch, sequences, beam_scores):
            # With fewer answers than beams, generate also returns placeholder rows (only padding)
            # and copies of real paths from the beams it starts at -1e9: keep each tool's best beam.
            best: dict[str, float] = {}
            for value, ids in sorted(zip(values, rows), key=lambda pair: -pair[0]):
                try:
                    best.setdefault(trie.tool_for(ids), value)
                except ValueError:
                    continue
            results[i] = [{"tool": tool, "score": value} for tool, value in list(best.items())[:k]]
    return results


def top_k_tools(model: ToolLMM, tokenizer: PromptTokenizer, prompts: list[torch.Tensor],
                features: list[torch.Tensor | None], trie: AnswerTrie, k: int, method: str = "beam",
                show_progress: bool = True, **beam_options) -> list[list[dict]]:
    """The ``k`` most probable catalogue tools per prompt, ``{"tool", "score"}`` best first:
    ``exact`` scores every answer (``score_catalogue``), ``beam`` searches the trie (``beam_top_k``,
    which takes ``beam_options``: ``batch_size``, ``num_beams``)."""
    if method not in TOP_K_METHODS:
        raise ValueError(f"top-k method {method!r} is not one of {list(TOP_K_METHODS)}")
    if method == "exact":
        return rank_tools(score_catalogue(model, tokenizer, prompts, features, trie, show_progress=show_progress), trie, k)
    return beam_top_k(model, tokenizer, prompts, features, trie, k, show_progress=show_progress, **beam_options)

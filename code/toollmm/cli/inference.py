"""Answer tool-selection queries with a trained checkpoint, or answer free prompts (any-to-any).

    python code/inference.py --ckpt ckpt/tiny/final --split test --output ckpt/tiny/predictions_test.json
    python code/inference.py --ckpt CKPT --data combined_data.json --media-root mm_dataset --output preds.json
    python code/inference.py --ckpt ckpt/tiny/final --split test --constrained --top-k 5 --output preds.json
    python code/inference.py --ckpt ckpt/tiny_chain/stage_3/final --prompt "Draw a red bus" --output answers.json
    python code/inference.py --ckpt CKPT --prompts-file prompts.txt --mode tool --top-k 3 --media-root media --output answers.json

Prompt mode (``--prompt``, repeatable, or ``--prompts-file``: one prompt a line, or a JSON list)
goes through ``toollmm.assistant``: media come as ``<Image>path</Image>``, ``<Audio>..</Audio>``,
``<Video>..</Video>`` tags in the prompt (with ``--media-root``, relative to it and confined to
it); ``--mode chat`` generates freely and decodes any signal-token run into a file under
``--output-dir`` (decoder folders from the checkpoint config, or ``--decoder image=DIR``);
``--mode tool`` picks a catalogue tool. It writes a JSON list with ``prompt``, ``text``,
``tool``, ``tools`` (``--top-k``), ``media`` (written files) and ``warnings``.

Split/data mode writes a JSON list with the original's fields (``question_id``, ``questions``,
``response``) plus ``tool`` (the parsed name, null when the answer is malformed),
``input_modality``, ``acceptable`` (the reference tools, when known) and the data's
``ambiguity`` (-1 none, else the type id), ``ifambiguity`` and ``onetomulti`` (these two null
when the data file lacks them; training files do).

Flags left out take the checkpoint config's ``inference:`` values (``constrained``, ``top_k``,
``top_k_method``, batch size, sampling). ``--constrained`` decodes only answers of the tool catalogue (the checkpoint's training
data, or ``--catalogue``): ``tool`` is then always a catalogue member. ``--top-k K`` (K > 1)
adds ``top_k``: K distinct catalogue tools with ``score`` = log p(answer | prompt), summed
over the answer's tokens, best first; ``tool`` stays the generated answer (greedy is not
always the most probable answer). Constrained responses are written as
``format_answer(tool)``, exactly the tokens that were decoded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
import tempfile
from pathlib import Path

import torch

from toollmm.catalogue import AnswerTrie, load_catalogue
from toollmm.checkpoint import load_for_inference
from toollmm.media import set_limits as set_media_limits
from toollmm.config import OUTPUT_MODALITIES, DataFile, resolve_path
from toollmm.data import Splits, load_splits
from toollmm.data.dataset import record_feature
from toollmm.data.records import DataFileError, DataReport, Record
from toollmm.data.split import group_queries
from toollmm.data.toolmmbench import read_toolmmbench
from toollmm.evaluate import normalize_ambiguity
from toollmm.features import FeatureCache, FrozenEncoder, featurize
from toollmm.generate import TOP_K_METHODS, beam_top_k, generate_responses, rank_tools, score_catalogue
from toollmm.prompts import MODES, build_example, parse_answer

log = logging.getLogger("toollmm.inference")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder written by training")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", choices=["test", "train"], help="the checkpoint config's test split, or a sample of its training queries")
    source.add_argument("--data", type=Path, help="a ToolMMBench JSON file")
    source.add_argument("--prompt", action="append", help="a prompt to answer (repeatable); media as <Image>path</Image> tags")
    source.add_argument("--prompts-file", type=Path, help="prompts to answer: one a line, or a JSON list of strings")
    parser.add_argument("--media-root", type=Path, default=None,
                        help="folder --data's media paths are relative to; for prompts, the folder their media tags "
                             "must stay inside")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--llm-path", default=None, help="base LLM folder, if it moved since training")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="cap a batch's KV cache at this many padded tokens (inference.max_batch_tokens)")
    parser.add_argument("--cache", choices=["dynamic", "static"], default=None,
                        help="KV cache of generation (inference.cache): static is preallocated and written in place")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decoding step (CUDA, --cache static; inference.compile)")
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N queries")
    parser.add_argument("--sample", type=int, default=0,
                        help="answer N queries spread evenly over the selection (every len/N-th, in file order): "
                             "a quicker estimate over all its files and modalities, where --limit takes the first file's")
    parser.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=None,
                        help="decode only catalogue answers (never a malformed or invented tool; --max-new-tokens is "
                             "then the longest answer's length); off = free generation")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="K > 1 adds a top_k field: K distinct tools with log p(answer | prompt), best first")
    parser.add_argument("--top-k-method", choices=TOP_K_METHODS, default=None,
                        help="beam: beam search over the catalogue trie (fast, may miss a better tool); "
                             "exact: scores every catalogue answer (the reference, ~one forward token per answer token)")
    parser.add_argument("--num-beams", type=int, default=None,
                        help="beams for --top-k-method beam (default 2K; more beams find the exact top K more often)")
    parser.add_argument("--catalogue", type=Path, default=None,
                        help="JSON list of tool names for --constrained/--top-k (default: the tools of the checkpoint's data files)")
    prompts = parser.add_argument_group("prompt mode (--prompt / --prompts-file)")
    prompts.add_argument("--mode", choices=MODES, default="chat",
                         help="chat: free generation, signal-token runs become media files; tool: a catalogue tool")
    prompts.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where generated media files go")
    prompts.add_argument("--decoder", action="append", default=[], metavar="MODALITY=DIR",
                         help="diffusers folder of an output modality's decoder, over the checkpoint config's (repeatable)")
    prompts.add_argument("--offload", action="store_true", help="keep decoders on the CPU between their submodules' runs (CUDA)")
    prompts.add_argument("--steps", type=int, default=25, help="diffusion steps per generated file")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    args.decoders = {}
    for item in args.decoder:
        modality, _, folder = item.partition("=")
        if modality not in OUTPUT_MODALITIES or not folder:
            parser.error(f"--decoder {item!r}: expected MODALITY=DIR with MODALITY one of {', '.join(OUTPUT_MODALITIES)}")
        args.decoders[modality] = folder
    return args


def spread(items: list, n: int) -> list:
    """``n`` of ``items`` evenly spaced, in order (every len/n-th, starting with the first); all of
    them when ``n`` is 0 or at least their number."""
    return [items[i * len(items) // n] for i in range(n)] if 0 < n < len(items) else items


def read_prompts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    text = args.prompts_file.read_text()
    if text.lstrip().startswith("["):
        prompts = json.loads(text)
        if not all(isinstance(p, str) for p in prompts):
            raise SystemExit(f"{args.prompts_file}: a JSON prompts file is a list of strings")
        return prompts
    return [line for line in text.splitlines() if line.strip()]


def answer_prompts(args) -> list[dict]:
    """Prompt mode: the Assistant over the prompts, in batches of the inference batch size."""
    # Imported here: the Assistant's decoders and media readers cost ~1 s of start-up (device
    # measurement) that split/data mode, the timed evaluation, does not need.
    from toollmm.assistant import Assistant, parse_prompt

    if args.num_beams is not None:
        raise SystemExit("--num-beams applies to --split/--data; prompt mode takes inference.top_k_method's default beams")
    prompts = read_prompts(args)
    parsed = []
    for prompt in prompts:
        try:
            parsed.append(parse_prompt(prompt, args.media_root))
        except ValueError as err:
            raise SystemExit(f"prompt {prompt!r}: {err}") from err
    with checkpoint_errors():
        assistant = Assistant(args.ckpt, decoders=args.decoders, offload=args.offload, output_dir=args.output_dir,
                              steps=args.steps, max_new_tokens=args.max_new_tokens or 128, catalogue=args.catalogue,
                              llm_path=args.llm_path)
    settings = assistant.config.inference
    for name in ("batch_size", "temperature", "top_p", "top_k_method"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    rows = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = parsed[start : start + settings.batch_size]
        replies = assistant.reply_batch([q for q, _ in chunk], [m for _, m in chunk], args.mode, args.top_k or 1)
        for prompt, (query, media), reply in zip(prompts[start:], chunk, replies):
            rows.append({"prompt": prompt, "query": query, "input_media": [{"modality": m, "path": str(p)} for m, p in media],
                         **dataclasses.asdict(reply)})
            for warning in reply.warnings:
                log.warning("%s: %s", prompt[:60], warning)
    return rows


def write_rows(rows: list[dict], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)
    os.replace(tmp, output)
    log.info("%d answers written to %s", len(rows), output)


def check_beam_settings(args, settings) -> None:
    """--num-beams against the merged settings (flags over the checkpoint's inference config)."""
    if args.num_beams is not None and (settings.top_k == 1 or settings.top_k_method != "beam"):
        raise SystemExit("--num-beams applies to --top-k K (K > 1) with --top-k-method beam only")
    if args.num_beams is not None and args.num_beams < settings.top_k:
        raise SystemExit(f"--num-beams {args.num_beams} cannot return {settings.top_k} tools: "
                         f"use at least --num-beams {settings.top_k}")


@contextlib.contextmanager
def checkpoint_errors():
    """A checkpoint that is missing, corrupt, not finite or made for another base: one line, exit 1."""
    try:
        yield
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"inference: {err}") from None


def check_data_file(path: Path, media_root: Path) -> None:
    """``--data`` holds at least one valid row, checked before the model loads (a file that does
    not would otherwise give ``[]`` and exit 0). Missing media is judged later, by the config."""
    try:
        records, report = read_toolmmbench(path, media_root, "text_only")
    except DataFileError as err:
        raise SystemExit(f"inference: --data {err}") from None
    if not report.rows:
        raise SystemExit(f"inference: --data {path}: the list is empty, nothing to answer")
    if not records:
        reason, examples = next(iter(report.examples.items()))
        raise SystemExit(f"inference: --data {path}: none of its {report.rows} rows is usable ({reason}: {examples[0]})")


def select_queries(args, config, splits: Splits | None = None) -> list[Record]:
    """``--data``'s queries, or those of the checkpoint config's split (``splits``: that config's
    ``load_splits``, when the caller has read it already)."""
    if args.data is not None:
        data = copy.deepcopy(config.data)  # config.data keeps naming the training data (the catalogue)
        media_root = args.media_root or args.data.parent
        data.train_files, data.eval_files = [DataFile(str(args.data.resolve()), str(Path(media_root).resolve()))], []
        data.split.test_fraction = 0.0
        return group_queries(load_splits(data).train)
    splits = splits if splits is not None else load_splits(config.data)
    return splits.test_queries() if args.split == "test" else splits.train_queries(config.data.train_eval_queries)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    # Each batch's static KV cache has its own shape: without expandable segments the freed caches
    # fragment the allocator (an H100 ran out of memory at batch 1024 with 20 GiB reserved, unused).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = answer_prompts(args) if args.prompt or args.prompts_file else answer_queries(args)
    write_rows(rows, args.output)
    return args.output


def answer_queries(args) -> list[dict]:
    """Split/data mode: ToolMMBench queries, answered and scored as the evaluation expects."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.data is not None:
        check_data_file(args.data, args.media_root or args.data.parent)
    log.info("starting on %s", device)
    start = time.perf_counter()
    with checkpoint_errors():
        model, tokenizer, config, meta = load_for_inference(args.ckpt, device, llm_path=args.llm_path)
    log.info("model loaded in %.1f s", time.perf_counter() - start)
    start = time.perf_counter()
    set_media_limits(config.data.media_limits)
    settings = config.inference
    for name in ("batch_size", "max_new_tokens", "temperature", "top_p", "constrained", "top_k", "top_k_method", "cache",
                 "compile", "max_batch_tokens"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    check_beam_settings(args, settings)

    trie = None
    needs_catalogue = (settings.constrained or settings.top_k > 1) and args.catalogue is None
    # Read once: the split's queries and the catalogue come from the same files.
    splits = load_splits(config.data) if args.data is None or needs_catalogue else None
    if settings.constrained or settings.top_k > 1:
        catalogue = load_catalogue(args.catalogue) if args.catalogue else splits.catalogue
        trie = AnswerTrie(tokenizer, catalogue)
        log.info("catalogue: %d tools, answers of %d-%d tokens", len(trie), min(map(len, trie.sequences)), trie.max_length)
    queries = select_queries(args, config, splits)
    if not queries:
        raise SystemExit(f"inference: no usable query in {args.data or args.split + ' split'} (the rows skipped "
                         "and why are logged above)")
    if args.limit:
        queries = queries[: args.limit]
    queries = spread(queries, args.sample)
    if trie is not None:
        unreachable = sum(1 for q in queries if q.tools and not set(q.tools) & set(trie.tools))
        if unreachable:
            log.warning("%d of %d queries accept only tools outside the catalogue: constrained and top-k answers "
                        "cannot be right for them (pass --catalogue to use another list)", unreachable, len(queries))
    encoder = FrozenEncoder(resolve_path(config.model.imagebind_path), config.model.imagebind_size, device)
    cache = FeatureCache(resolve_path(config.data.feature_cache_dir), encoder.identity, encoder.out_dim)
    report = DataReport(rows=len(queries), used=len(queries))
    queries, features = featurize(queries, encoder, cache, report)
    del encoder
    if report.skipped:
        log.warning("%s", report.summary())

    examples = [build_example(tokenizer, q.query, bool(q.media), None, config.data.max_tgt_len) for q in queries]
    prompts = [torch.tensor(e.input_ids) for e in examples]
    cut = [q.id for q, e in zip(queries, examples) if e.truncated]
    if cut:
        # The prompt then ends inside the query, before "### Assistant:": the answer is a guess.
        log.warning("%d of %d queries are longer than data.max_tgt_len=%d tokens and were cut before the answer "
                    "prompt (e.g. %s); their answers are unreliable", len(cut), len(queries), config.data.max_tgt_len,
                    ", ".join(map(str, cut[:3])))
    query_features = [record_feature(q, features) for q in queries]
    log.info("%d queries read, featurized and tokenized in %.1f s", len(queries), time.perf_counter() - start)
    start = time.perf_counter()
    responses = generate_responses(
        model, tokenizer, prompts, query_features,
        settings.batch_size, settings.max_new_tokens, settings.temperature, settings.top_p,
        constraint=trie if settings.constrained else None, cache=settings.cache, compile=settings.compile,
        max_batch_tokens=settings.max_batch_tokens,
    )
    seconds = time.perf_counter() - start
    log.info("answered %d queries in %.1f s (%.1f queries/s, batch size %d, %s)", len(prompts), seconds,
             len(prompts) / max(seconds, 1e-9), settings.batch_size, "constrained" if settings.constrained else "free")
    top_k = None
    if settings.top_k > 1:
        start = time.perf_counter()
        if settings.top_k_method == "exact":
            top_k = rank_tools(score_catalogue(model, tokenizer, prompts, query_features, trie), trie, settings.top_k)
        else:
            top_k = beam_top_k(model, tokenizer, prompts, query_features, trie, settings.top_k, settings.batch_size,
                               num_beams=args.num_beams)
        log.info("top-%d (%s) in %.1f s", settings.top_k, settings.top_k_method, time.perf_counter() - start)
    rows = [
        {
            "question_id": q.id,
            "questions": q.query,
            "response": response,
            "tool": parse_answer(response),
            "input_modality": q.input_modality,
            "acceptable": q.tools,
            # For the evaluation's breakdowns.
            "ambiguity": normalize_ambiguity(q.ambiguity),
            "ifambiguity": q.ifambiguity,
            "onetomulti": q.onetomulti,
            **({"top_k": top_k[i]} if top_k is not None else {}),
        }
        for i, (q, response) in enumerate(zip(queries, responses))
    ]
    return rows


if __name__ == "__main__":
    main()

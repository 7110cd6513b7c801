"""Answer tool-selection queries with a trained checkpoint, or answer free prompts (any-to-any).

    python code/inference.py --ckpt ckpt/tiny/final --split test --output ckpt/tiny/predictions_test.json
    python code/inference.py --ckpt CKPT --data combined_data.json --media-root mm_dataset --output preds.json
    python code/inference.py --ckpt ckpt/tiny/final --split test --output preds.json inference.constrained=true inference.top_k=5
    python code/inference.py --ckpt ckpt/tiny_chain/stage_3/final --prompt "Draw a red bus" --output answers.json
    python code/inference.py --ckpt CKPT --prompts-file prompts.txt --mode tool --media-root media --output answers.json \
        inference.top_k=3

Settings are the checkpoint config's ``inference:`` section, changed by ``key=value`` overrides as
in training (``inference.batch_size=8 inference.max_new_tokens=32``; ``model.llm_path=DIR`` if the
base LLM moved); an unknown key is refused with its name before the model loads.
``inference.constrained=true`` decodes only answers of the tool catalogue (the checkpoint's
training data, or ``--catalogue``): ``tool`` is then always a catalogue member.
``inference.top_k=K`` (K > 1) adds ``top_k``: K distinct catalogue tools with ``score`` =
log p(answer | prompt), summed over the answer's tokens, best first (``inference.top_k_method``:
beam or exact); ``tool`` stays the generated answer (greedy is not always the most probable
answer). Constrained responses are written as ``format_answer(tool)``, exactly the tokens that
were decoded.
``inference.open_set_slots=N`` gives the last N places of ``top_k`` to catalogue tools the model
never trained on, ranked by the tool retriever (``train_retriever.py``; docs/open_set.md).

Split/data mode writes a JSON list with the original's fields (``question_id``, ``questions``,
``response``) plus ``tool`` (the parsed name, null when the answer is malformed),
``input_modality``, ``acceptable`` (the reference tools, when known) and the data's
``ambiguity`` (-1 none, else the type id), ``ifambiguity`` and ``onetomulti`` (these two null
when the data file lacks them; training files do).

Prompt mode (``--prompt``, repeatable, or ``--prompts-file``: one prompt a line, or a JSON list):
media come as ``<Image>path</Image>``, ``<Audio>..</Audio>``, ``<Video>..</Video>`` tags in the
prompt (with ``--media-root``, relative to it and confined to it); ``--mode chat`` generates
freely (``inference.chat_max_new_tokens``) and decodes any signal-token run into a file under
``--output-dir`` (decoder folders from the checkpoint config, or ``--decoder image=DIR``);
``--mode tool`` picks a catalogue tool. It writes a JSON list with ``prompt``, ``text``,
``tool``, ``tools`` (``inference.top_k``), ``media`` (written files) and ``warnings``.

Both modes answer through ``toollmm.assistant.Assistant``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from toollmm.assistant import Assistant, parse_decoders, parse_prompt
from toollmm.catalogue import AnswerTrie
from toollmm.config import INFERENCE_OVERRIDES, DataFile, RunConfig, resolve_path
from toollmm.config_help import keys_help
from toollmm.data import Splits, load_splits
from toollmm.data.dataset import record_feature
from toollmm.data.records import DataFileError, DataReport, Record
from toollmm.data.split import group_queries
from toollmm.data.toolmmbench import read_toolmmbench
from toollmm.evaluate import normalize_ambiguity
from toollmm.features import FeatureCache, FrozenEncoder, featurize
from toollmm.prompts import MODES, build_example, parse_answer

log = logging.getLogger("toollmm.inference")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, epilog=keys_help(INFERENCE_OVERRIDES),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N queries")
    parser.add_argument("--sample", type=int, default=0,
                        help="answer N queries spread evenly over the selection (every len/N-th, in file order): "
                             "a quicker estimate over all its files and modalities, where --limit takes the first file's")
    parser.add_argument("--catalogue", type=Path, default=None,
                        help="catalogue file for constrained and top-k answers: a JSON list of tool names, or a JSON list "
                             "or JSON Lines of tool entries (docs/open_set.md); default: the tools of the checkpoint's data files")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="settings over the checkpoint config's: inference.<key>=VALUE (e.g. inference.top_k=5 "
                             "inference.constrained=true), model.llm_path=DIR if the base LLM moved")
    prompts = parser.add_argument_group("prompt mode (--prompt / --prompts-file)")
    prompts.add_argument("--mode", choices=MODES, default="chat",
                         help="chat: free generation, signal-token runs become media files; tool: a catalogue tool")
    prompts.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where generated media files go")
    prompts.add_argument("--decoder", action="append", default=[], metavar="MODALITY=DIR",
                         help="diffusers folder of an output modality's decoder, over the checkpoint config's (repeatable)")
    prompts.add_argument("--offload", action="store_true", help="keep decoders on the CPU between their submodules' runs (CUDA)")
    prompts.add_argument("--steps", type=int, default=25, help="diffusion steps per generated file")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    try:
        args.decoders = parse_decoders(args.decoder)
    except ValueError as err:
        parser.error(str(err))
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


def answer_prompts(args, device: torch.device) -> list[dict]:
    """Prompt mode: the prompts' replies in ``args.mode``, with the prompts' text and media."""
    prompts = read_prompts(args)
    parsed = []
    for prompt in prompts:  # before the model loads: a refused media path costs nothing
        try:
            parsed.append(parse_prompt(prompt, args.media_root))
        except ValueError as err:
            raise SystemExit(f"prompt {prompt!r}: {err}") from err
    with checkpoint_errors():
        assistant = Assistant.from_checkpoint(args.ckpt, device, args.overrides, decoders=args.decoders,
                                              offload=args.offload, output_dir=args.output_dir, steps=args.steps,
                                              catalogue=args.catalogue)
    replies = assistant.reply_batch([q for q, _ in parsed], [m for _, m in parsed], args.mode)
    rows = []
    for prompt, (query, media), reply in zip(prompts, parsed, replies):
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


@contextlib.contextmanager
def checkpoint_errors():
    """A checkpoint that is missing, corrupt, not finite or made for another base, or an override
    the config refuses: one line, exit 1."""
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = answer_prompts(args, device) if args.prompt or args.prompts_file else answer_queries(args, device)
    write_rows(rows, args.output)
    return args.output


def answer_queries(args, device: torch.device) -> list[dict]:
    """Split/data mode: ToolMMBench queries, answered and scored as the evaluation expects."""
    if args.data is not None:
        check_data_file(args.data, args.media_root or args.data.parent)
    log.info("starting on %s", device)
    start = time.perf_counter()
    with checkpoint_errors():
        assistant = Assistant.from_checkpoint(args.ckpt, device, args.overrides, catalogue=args.catalogue)
    log.info("model loaded in %.1f s", time.perf_counter() - start)
    start = time.perf_counter()
    config, settings = assistant.config, assistant.settings
    trie = None
    needs_catalogue = settings.constrained or settings.top_k > 1
    # Read once: the split's queries and the catalogue come from the same files.
    splits = load_splits(config.data) if args.data is None or (needs_catalogue and args.catalogue is None) else None
    if needs_catalogue:
        with checkpoint_errors():
            assistant.set_catalogue(args.catalogue or splits.catalogue_of(settings.catalogue_tools))
            trie = assistant.catalogue_trie()
            if settings.open_set_slots:
                assistant.tool_retriever()  # a missing retriever stops the run before any decoding
        log.info("catalogue: %d tools, answers of %d-%d tokens", len(trie), min(map(len, trie.sequences)), trie.max_length)
    queries = pick_queries(args, config, splits, trie)
    queries, features = featurize_queries(queries, config, device)
    prompts = tokenize_queries(queries, assistant, config.data.max_tgt_len)
    log.info("%d queries read, featurized and tokenized in %.1f s", len(queries), time.perf_counter() - start)
    responses, ranked = assistant.answer_tools(prompts, features, settings.constrained, settings.top_k, show_progress=True,
                                               texts=[q.query for q in queries])
    in_split = args.data is None  # --data queries are not the split's: no seen/unseen tag
    return [query_row(q, response, ranked[i] if ranked is not None else None,
                      splits.tool_split_tag(q) if in_split else None)
            for i, (q, response) in enumerate(zip(queries, responses))]


def pick_queries(args, config: RunConfig, splits: Splits | None, trie: AnswerTrie | None) -> list[Record]:
    """The queries to answer: ``--data``'s or the split's, then ``--limit`` and ``--sample``."""
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
    return queries


def featurize_queries(queries: list[Record], config: RunConfig, device: torch.device
                      ) -> tuple[list[Record], list[torch.Tensor | None]]:
    """The queries whose media decode, and their media slots' features (cached on disk by
    content); the encoder is freed before the LLM answers."""
    encoder = FrozenEncoder(resolve_path(config.model.imagebind_path), config.model.imagebind_size, device)
    cache = FeatureCache(resolve_path(config.data.feature_cache_dir), encoder.identity, encoder.out_dim)
    report = DataReport(rows=len(queries), used=len(queries))
    queries, features = featurize(queries, encoder, cache, report)
    del encoder
    if report.skipped:
        log.warning("%s", report.summary())
    return queries, [record_feature(q, features) for q in queries]


def tokenize_queries(queries: list[Record], assistant: Assistant, max_tgt_len: int) -> list[torch.Tensor]:
    """Each query's prompt token ids; a query cut by ``data.max_tgt_len`` is logged."""
    examples = [build_example(assistant.tokenizer, q.query, bool(q.media), None, max_tgt_len) for q in queries]
    cut = [q.id for q, e in zip(queries, examples) if e.truncated]
    if cut:
        # The prompt then ends inside the query, before "### Assistant:": the answer is a guess.
        log.warning("%d of %d queries are longer than data.max_tgt_len=%d tokens and were cut before the answer "
                    "prompt (e.g. %s); their answers are unreliable", len(cut), len(queries), max_tgt_len,
                    ", ".join(map(str, cut[:3])))
    return [torch.tensor(e.input_ids) for e in examples]


def query_row(record: Record, response: str, top_k: list[dict] | None, split: str | None = None) -> dict:
    """One prediction row: the original's fields, the parsed tool and the data's breakdown fields
    (``tool_split``, seen or unseen, when the run held tools out of training)."""
    return {
        "question_id": record.id,
        "questions": record.query,
        "response": response,
        "tool": parse_answer(response),
        "input_modality": record.input_modality,
        "acceptable": record.tools,
        # For the evaluation's breakdowns.
        "ambiguity": normalize_ambiguity(record.ambiguity),
        "ifambiguity": record.ifambiguity,
        "onetomulti": record.onetomulti,
        **({"top_k": top_k} if top_k is not None else {}),
        **({"tool_split": split} if split is not None else {}),
    }


if __name__ == "__main__":
    main()

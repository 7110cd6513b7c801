"""The inference front-end: a checkpoint loaded once, answering requests (text plus optional media)
with a tool choice or a chat reply, in batches. ``code/inference.py`` (split, data and prompt
mode) and the demo app both answer through it.

    assistant = Assistant.from_checkpoint("ckpt/tiny_chain/stage_3/final", "cpu", ["inference.top_k=3"])
    reply = assistant.reply("Draw a red bus", mode="chat", on_text=print)
    reply.text, reply.media    # "...", [{"modality": "image", "path": "outputs/image_....png"}]
    responses, top_k = assistant.answer_tools(prompt_ids, features, constrained=True, top_k=3)

Input media are encoded by the checkpoint's ImageBind and fill the prompt's one media slot;
several media have their features summed before the input projector, exactly as training
combines a row's media (``data.dataset.record_feature``). (NExT-GPT's
``extract_multimodal_feature`` summed the projected embeddings instead, which differs by the
projector's bias counted once per medium.)

``answer_tools`` is the one path of tool answers: free or constrained to the catalogue (the
checkpoint's training data files, or ``catalogue=``), plus the top k tools by
``inference.top_k_method``; with ``inference.open_set_slots`` N, the last N of them are the tool
retriever's picks among catalogue tools outside the training rows (``toollmm.tool_retriever``).
``mode="tool"`` answers through it, always constrained; split and data
mode call it with ``inference.constrained``. ``mode="chat"`` generates freely. When a response holds a signal-token run (``[IMG0]..[IMG3]``)
and the checkpoint has output projectors, one more forward over prompt + response reads the
run's last-layer states (the states training aligned; generation's own are not kept),
``ToolLMM.project_runs`` maps them to the decoder's conditioning, and the modality's diffusers
decoder (``toollmm.decoders``) writes the file.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from toollmm.catalogue import AnswerTrie, ToolEntry, read_tool_entries
from toollmm.checkpoint import load_for_inference
from toollmm.config import InferenceConfig, RunConfig, resolve_path
from toollmm.data.records import MediaRef
from toollmm.decoders import MediaDecoder
from toollmm.generate import generate_responses, left_pad, top_k_tools
from toollmm.media import MediaError
from toollmm.media import set_limits as set_media_limits
from toollmm.modalities import MODALITIES
from toollmm.model.toollmm import ToolLMM
from toollmm.output_modalities import OUTPUT_MODALITIES
from toollmm.prompts import IGNORE_INDEX, MODES, STOP_STRING, build_example, parse_answer
from toollmm.tokenization import PromptTokenizer

log = logging.getLogger(__name__)
_TAG = re.compile(r"<(Image|Audio|Video)>(.*?)</\1>", re.IGNORECASE | re.DOTALL)


@dataclass
class Reply:
    text: str
    """The response, stop string cut and signal tokens removed."""
    tools: list[dict] = field(default_factory=list)
    """``[{"tool": name, "score": float}, ...]`` best first (tool mode, top_k > 1); with top_k 1 the
    parsed tool with score None (or nothing). Open-set slots add ``"ranked_by": "retriever"``."""
    tool: str | None = None
    """The parsed tool (tool mode), else None."""
    media: list[dict] = field(default_factory=list)
    """``[{"modality": "image" | "video" | "audio", "path": str}]``, files written for the response's signal-token runs."""
    warnings: list[str] = field(default_factory=list)


def parse_prompt(text: str, media_root: str | Path | None = None) -> tuple[str, list[tuple[str, Path]]]:
    """``"<Image>a.png</Image> what is it?"`` → ``("what is it?", [("image", Path("a.png"))])``.

    Several tags are allowed (the original's ``<Image>``, ``<Audio>``, ``<Video>``). With
    ``media_root``, relative paths are taken from it and every path must resolve inside it
    (``..`` or a link out of it is refused): the app serves that folder, nothing else.
    """
    media = []
    for match in _TAG.finditer(text):
        modality, raw = match.group(1).lower(), match.group(2).strip()
        if not raw:
            raise ValueError(f"empty <{match.group(1)}> tag in the prompt: put a file path between the tags")
        path = Path(raw)
        if media_root is not None:
            root = Path(media_root).resolve()
            path = (root / path).resolve()
            if not path.is_relative_to(root):
                raise ValueError(f"media path {raw!r} resolves outside the media folder {root}: refused")
        media.append((modality, path))
    query = " ".join(_TAG.sub(" ", text).split())
    return query, media


def parse_decoders(items: Sequence[str]) -> dict[str, str]:
    """``--decoder`` values, ``["image=DIR", ...]`` → ``{"image": "DIR"}``; a ValueError names a malformed one."""
    decoders = {}
    for item in items:
        modality, _, folder = item.partition("=")
        if modality not in OUTPUT_MODALITIES or not folder:
            raise ValueError(f"--decoder {item!r}: expected MODALITY=DIR with MODALITY one of {', '.join(OUTPUT_MODALITIES)}")
        decoders[modality] = folder
    return decoders


def normalize_runs(ids: list[int], runs: dict[str, list[int]]) -> tuple[list[int], list[str]]:
    """Response ids with every signal-token run made whole, and a warning per run that was not.

    A stretch of one modality's run tokens that is not exactly ``[X0] .. [Xn-1]`` (cut short by
    the token limit, out of order) is replaced by the whole run: the projector needs all n states.
    """
    out, warnings, i = [], [], 0
    owner = {token: m for m, run in runs.items() for token in run}
    while i < len(ids):
        modality = owner.get(ids[i])
        if modality is None:
            out.append(ids[i])
            i += 1
            continue
        run = runs[modality]
        if ids[i : i + len(run)] == run:
            out += run
            i += len(run)
            continue
        end = i + 1  # the broken run ends at the next token of another kind or at a new run's start
        while end < len(ids) and owner.get(ids[end]) == modality and ids[end] != run[0]:
            end += 1
        warnings.append(f"the {modality} signal-token run was incomplete ({end - i} of {len(run)} tokens); "
                        "completed it to decode the output")
        out += run
        i = end
    return out, warnings


class _TextPieces(BaseStreamer):
    """Calls ``on_text`` with each new piece of visible text as generate produces tokens (batch 1).

    Text that may be the start of the stop string, or half of a multi-byte character, is held
    back until the next token settles it, so the pieces add up to the reply's text (before its
    surrounding whitespace is stripped).
    """

    def __init__(self, visible: Callable[[list[int]], str], on_text: Callable[[str], None]):
        self.visible, self.on_text = visible, on_text
        self.ids: list[int] = []
        self.sent = 0
        self.started = False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # generate first puts the prompt's ids (none: it gets embeddings)
            self.started = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.visible(self.ids)
        hold = next((n for n in range(len(STOP_STRING) - 1, 0, -1) if text.endswith(STOP_STRING[:n])), 0)
        if text.endswith("\ufffd"):
            hold = max(hold, 1)
        self._emit(text[: len(text) - hold])

    def end(self) -> None:
        self._emit(self.visible(self.ids))

    def _emit(self, text: str) -> None:
        if len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)


class Assistant:
    """A loaded checkpoint answering requests (text plus optional media) with a tool choice or a
    chat reply with generated media, in batches of ``inference.batch_size``: the one front-end of
    ``code/inference.py`` (split, data and prompt mode) and the demo.

    ``Assistant.from_checkpoint(ckpt, device, overrides)`` loads a checkpoint on the caller's
    device; ``__init__`` takes a loaded model and computes where its weights are. Settings are
    the config's ``inference`` section. ``decoders``: modality → diffusers folder, over the
    checkpoint config's ``model.outputs.<modality>.decoder_path``; each loads on first use.
    ``offload`` moves decoder submodules to the GPU only while they run (less memory, slower).
    ``steps``: diffusion steps per generated file. ``catalogue``: tool names (a list or a JSON
    file) for constrained and top-k answers, instead of the tools of the checkpoint's data files.
    ``retriever``: the folder of the tool retriever for ``inference.open_set_slots`` (loaded on first use).
    """

    def __init__(self, model: ToolLMM, tokenizer: PromptTokenizer, config: RunConfig, *,
                 decoders: dict[str, str] | None = None, offload: bool = False, output_dir="outputs", steps: int = 25,
                 catalogue: Sequence[str] | str | Path | None = None, retriever: str | Path | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = next(model.parameters()).device
        self.decoder_paths = {m: Path(d) for m, d in (decoders or {}).items()}
        unknown = set(self.decoder_paths) - set(OUTPUT_MODALITIES)
        if unknown:
            raise ValueError(f"decoders for {sorted(unknown)}: the output modalities are {list(OUTPUT_MODALITIES)}")
        self.offload, self.output_dir, self.steps = offload, Path(output_dir), steps
        self._catalogue_source = catalogue
        self._entries: list[ToolEntry] | None = None
        self._trie: AnswerTrie | None = None
        self._retriever_dir, self._retriever = retriever, None
        self._encoder = None
        self._features: dict[tuple, torch.Tensor] = {}
        self._decoders: dict[str, MediaDecoder] = {}
        # One request at a time: a UI may call from several threads, and the lazily built encoder,
        # catalogue and decoders (and the GPU) are shared. Reentrant: a reply calls answer_tools.
        self._lock = threading.RLock()
        signal = self.model.signal
        self._run_names = (re.compile("|".join(re.escape(n) for n in signal.names if n.startswith("[")))
                           if signal is not None else None)

    @classmethod
    def from_checkpoint(cls, ckpt_dir, device: torch.device | str, overrides: Sequence[str] = (), dtype=None,
                        **options) -> Assistant:
        """Load ``ckpt_dir`` on ``device`` with ``key=value`` overrides of its config
        (``inference.top_k=5``, ``model.llm_path=DIR``; checked before the model is built).
        ``dtype`` (a torch dtype or "bf16"/"fp16"/"fp32"): default the checkpoint's
        ``model.dtype`` on CUDA, float32 on a CPU. ``options``: those of ``__init__``."""
        model, tokenizer, config, _ = load_for_inference(Path(ckpt_dir), device, dtype, overrides)
        set_media_limits(config.data.media_limits)
        options.setdefault("retriever", resolve_path(config.inference.tool_retriever) if config.inference.tool_retriever
                           else Path(ckpt_dir) / "tool_retriever")
        return cls(model, tokenizer, config, **options)

    @property
    def settings(self) -> InferenceConfig:
        return self.config.inference

    # ------------------------------------------------------------------ public

    def reply(self, prompt: str, media: Sequence[tuple[str, str | Path]] = (), mode: str = "chat",
              top_k: int | None = None, on_text: Callable[[str], None] | None = None) -> Reply:
        """One answer; ``on_text`` gets the response as it is generated (chat mode; tool mode
        calls it once with the chosen answer). ``top_k``: default ``inference.top_k``."""
        return self._answer([prompt], [media], mode, top_k, on_text)[0]

    def reply_batch(self, prompts: Sequence[str], media_lists: Sequence[Sequence[tuple[str, str | Path]]] | None = None,
                    mode: str = "chat", top_k: int | None = None) -> list[Reply]:
        """Answers for many prompts, generated in batches of ``inference.batch_size`` (left padded);
        media files are decoded one by one."""
        media_lists = list(media_lists) if media_lists is not None else [()] * len(prompts)
        if len(media_lists) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(media_lists)} media lists")
        size = self.settings.batch_size
        return [reply for start in range(0, len(prompts), size)
                for reply in self._answer(list(prompts[start : start + size]), media_lists[start : start + size],
                                          mode, top_k, None)]

    def set_catalogue(self, catalogue: Sequence[str] | str | Path | None) -> None:
        """Tool names (a list or a JSON file) for constrained and top-k answers; None: the tools
        of the checkpoint's data files."""
        self._catalogue_source, self._entries, self._trie = catalogue, None, None

    def catalogue_entries(self) -> list[ToolEntry]:
        """The catalogue's tool entries (a catalogue file's fields; names alone otherwise), read on
        first use; OSError or ValueError when they cannot be read."""
        if self._entries is None:
            source = self._catalogue_source
            if isinstance(source, (str, Path)):
                self._entries = read_tool_entries(Path(source))
                return self._entries
            if source is None:
                from toollmm.data import load_splits  # the data files are read only when a catalogue is needed

                source = load_splits(self.config.data).catalogue_of(self.settings.catalogue_tools)
            self._entries = [ToolEntry(name=name) for name in sorted(set(source))]
        return self._entries

    def catalogue_trie(self) -> AnswerTrie:
        """The catalogue's answer trie, built on first use; OSError or ValueError when it cannot be read."""
        if self._trie is None:
            self._trie = AnswerTrie(self.tokenizer, sorted(entry.name for entry in self.catalogue_entries()))
        return self._trie

    def tool_retriever(self):
        """The tool retriever of open-set slots, loaded on first use; FileNotFoundError names the folder."""
        if self._retriever is None:
            from toollmm.tool_retriever import ToolRetriever

            if self._retriever_dir is None:
                raise FileNotFoundError("inference.open_set_slots needs a tool retriever: set inference.tool_retriever")
            self._retriever = ToolRetriever.load(Path(self._retriever_dir))
        return self._retriever

    def with_open_set_slots(self, ranked: list[list[dict]], texts: Sequence[str]) -> list[list[dict]]:
        """The model's first ``top_k - N`` tools, then the retriever's best N catalogue tools that
        the model never trained on (``inference.open_set_slots`` = N). The model keeps the first
        place: a closed-set model puts no weight worth ranking on a new tool, and a fixed share of
        places keeps its seen-tool ranking intact (measured in docs/open_set.md)."""
        slots = self.settings.open_set_slots
        # As many new tools as the model lists: enough to fill the slots after dropping those it already has.
        depth = max((len(top) for top in ranked), default=0)
        picks = self.tool_retriever().rank_new_tools(texts, self.catalogue_entries(), depth)
        merged = []
        for model_top, new in zip(ranked, picks, strict=True):
            keep = model_top[: len(model_top) - slots]
            taken = {entry["tool"] for entry in keep}
            extra = [{**entry, "ranked_by": "retriever"} for entry in new if entry["tool"] not in taken][:slots]
            merged.append(keep + extra)
        return merged

    def answer_tools(self, prompts: list[torch.Tensor], features: list[torch.Tensor | None], constrained: bool,
                     top_k: int, show_progress: bool = False, texts: Sequence[str] | None = None
                     ) -> tuple[list[str], list[list[dict]] | None]:
        """Tool answers for prompt token ids (media slots filled by ``features``): the responses
        (free, or catalogue answers when ``constrained``) and, with ``top_k`` > 1, the ``top_k``
        most probable catalogue tools per prompt (``inference.top_k_method``), else None.
        ``texts``: the requests' text, which open-set slots (``with_open_set_slots``) need."""
        settings = self.settings
        with self._lock:
            trie = self.catalogue_trie() if constrained or top_k > 1 else None
            start = time.perf_counter()
            responses = generate_responses(
                self.model, self.tokenizer, prompts, features, settings.batch_size, settings.max_new_tokens,
                settings.temperature, settings.top_p, show_progress, constraint=trie if constrained else None,
                cache=settings.cache, compile=settings.compile, max_batch_tokens=settings.max_batch_tokens)
            seconds = time.perf_counter() - start
            log.info("answered %d queries in %.1f s (%.1f queries/s, batch size %d, %s)", len(prompts), seconds,
                     len(prompts) / max(seconds, 1e-9), settings.batch_size, "constrained" if constrained else "free")
            if top_k == 1:
                return responses, None
            start = time.perf_counter()
            ranked = top_k_tools(self.model, self.tokenizer, prompts, features, trie, top_k, settings.top_k_method,
                                 show_progress, batch_size=settings.batch_size, num_beams=settings.num_beams)
            log.info("top-%d (%s) in %.1f s", top_k, settings.top_k_method, time.perf_counter() - start)
            if settings.open_set_slots:
                if texts is None or top_k <= settings.open_set_slots:
                    raise ValueError(f"inference.open_set_slots={settings.open_set_slots} needs top_k above it (got "
                                     f"{top_k}) and the requests' texts (texts=)")
                ranked = self.with_open_set_slots(ranked, texts)
            return responses, ranked

    # ------------------------------------------------------------------ prompts

    def _answer(self, prompts, media_lists, mode, top_k, on_text) -> list[Reply]:
        top_k = self.settings.top_k if top_k is None else top_k
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {list(MODES)}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        with self._lock, torch.no_grad():
            return self._answer_locked(prompts, media_lists, mode, top_k, on_text)

    def _answer_locked(self, prompts, media_lists, mode, top_k, on_text) -> list[Reply]:
        warnings = [[] for _ in prompts]
        slot_features = [self._slot_feature(media, notes) for media, notes in zip(media_lists, warnings)]
        ids = [torch.tensor(build_example(self.tokenizer, p, e is not None, None, self.config.data.max_tgt_len).input_ids)
               for p, e in zip(prompts, slot_features)]
        if mode == "tool":
            replies = self._tools(ids, slot_features, top_k, warnings, prompts)
            if on_text is not None:
                on_text(replies[0].text)
            return replies
        return self._chat(ids, slot_features, warnings, on_text)

    def _slot_feature(self, media, warnings: list[str]) -> torch.Tensor | None:
        """The media slot's input: the ImageBind features of every medium, summed (as in
        training, ``record_feature``; the input projector then maps the sum)."""
        features = []
        for modality, path in media:
            if modality not in MODALITIES:
                raise ValueError(f"media modality {modality!r} is not one of {list(MODALITIES)}")
            try:
                features.append(self._feature(MediaRef(modality, Path(path))))
            except MediaError as err:
                warnings.append(f"ignored {modality} {path}: {err.reason}")
        if not features:
            return None
        return torch.stack(features).sum(0).to(self.device)

    def _feature(self, ref: MediaRef) -> torch.Tensor:
        """ImageBind feature of one file, remembered by path, size and modification time (a chat
        re-sends its media every turn)."""
        path = ref.path
        if not path.is_file():
            raise MediaError(path, "no such file")
        stat = path.stat()
        key = (ref.modality, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._features:
            if self._encoder is None:
                from toollmm.features import FrozenEncoder  # ImageBind loads only when media come

                model = self.config.model
                self._encoder = FrozenEncoder(resolve_path(model.imagebind_path), model.imagebind_size, self.device)
            self._features[key] = self._encoder.encode(ref)
        return self._features[key]

    # ------------------------------------------------------------------ tool mode

    def _tools(self, ids, slot_features, top_k, warnings, texts) -> list[Reply]:
        """Catalogue answers (free generation, with a warning, when there is no catalogue)."""
        constrained = True
        try:
            self.catalogue_trie()
        except (OSError, ValueError) as err:
            for notes in warnings:
                notes.append(f"no tool catalogue ({err}); the answer is free generation, pass catalogue= to constrain it")
            constrained, top_k = False, 1
        responses, ranked = self.answer_tools(ids, slot_features, constrained, top_k, texts=texts)
        replies = []
        for i, response in enumerate(responses):
            tool = parse_answer(response)
            tools = ranked[i] if ranked is not None else ([{"tool": tool, "score": None}] if tool else [])
            replies.append(Reply(self._visible(response).strip(), tools, tool, [], warnings[i]))
        return replies

    # ------------------------------------------------------------------ chat mode

    def _chat(self, ids, slot_features, warnings, on_text) -> list[Reply]:
        settings = self.settings
        input_ids, mask = left_pad(ids, self.tokenizer.pad_token_id)
        present = [e for e in slot_features if e is not None]
        embeds = self.model.embed_inputs(input_ids.to(self.device), torch.stack(present) if present else None)
        sampling = ({"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
                    if settings.temperature > 0 else {"do_sample": False})
        streamer = _TextPieces(self._visible_ids, on_text) if on_text is not None else None
        output = self.model.llm.generate(
            inputs_embeds=embeds, attention_mask=mask.to(self.device), max_new_tokens=self.settings.chat_max_new_tokens,
            stop_strings=[STOP_STRING], tokenizer=self.tokenizer.hf, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, top_k=None, streamer=streamer, **sampling,
        )
        replies = []
        ends = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}  # finished rows are padded
        for prompt, slot, row, notes in zip(ids, slot_features, output.tolist(), warnings):
            response = row[: next((i for i, t in enumerate(row) if t in ends), len(row))]
            reply = Reply(self._visible_ids(response).strip(), warnings=notes)
            reply.media = self._media(prompt, slot, response, notes)
            replies.append(reply)
        return replies

    def _visible(self, text: str) -> str:
        index = text.find(STOP_STRING)
        text = text if index < 0 else text[:index]
        return self._run_names.sub("", text) if self._run_names is not None else text

    def _visible_ids(self, ids: list[int]) -> str:
        return self._visible(self.tokenizer.decode(ids, skip_special_tokens=True))

    # ------------------------------------------------------------------ signal tokens → media

    def _media(self, prompt: torch.Tensor, slot: torch.Tensor | None, response: list[int], warnings: list[str]) -> list[dict]:
        signal = self.model.signal
        if signal is None or not any(t in response for run in signal.ids.values() for t in run):
            return []
        if self.model.output_projectors is None:
            warnings.append("the response holds signal tokens but the checkpoint has no output projectors")
            return []
        response, notes = normalize_runs(response, signal.ids)
        warnings += notes
        ids = torch.cat([prompt, torch.tensor(response, dtype=prompt.dtype)])[None].to(self.device)
        labels = torch.tensor([IGNORE_INDEX] * len(prompt) + response, device=self.device)[None]
        embeds = self.model.embed_inputs(ids, slot[None] if slot is not None else None)
        hidden = self.model.llm(inputs_embeds=embeds, output_hidden_states=True, use_cache=False).hidden_states[-1]
        media = []
        for modality, run in signal.ids.items():
            if run and run[0] in response:
                conditioning = self.model.project_runs(modality, hidden, embeds, labels)
                for one in conditioning:
                    path = self._decode(modality, one, warnings)
                    if path is not None:
                        media.append({"modality": modality, "path": str(path)})
        return media

    def _decode(self, modality: str, conditioning: torch.Tensor, warnings: list[str]) -> Path | None:
        decoder = self._decoders.get(modality)
        if decoder is None:
            folder = self.decoder_paths.get(modality) or resolve_path(self.config.model.outputs.modality(modality).decoder_path)
            if not (Path(folder) / "model_index.json").is_file():
                warnings.append(f"no {modality} decoder at {folder} (a diffusers folder with model_index.json): "
                                f"the {modality} was not generated; pass decoders={{'{modality}': DIR}}")
                return None
            decoder = self._decoders[modality] = MediaDecoder(folder, modality, self.device, offload=self.offload)
        out = self.output_dir / f"{modality}_{uuid.uuid4().hex[:12]}"
        try:
            return decoder.decode(conditioning, out_path=out, steps=self.steps)
        except (OSError, RuntimeError, ValueError) as err:  # e.g. a decoder of another width: the text still stands
            log.exception("the %s decoder %s failed", modality, decoder.folder)
            warnings.append(f"the {modality} decoder at {decoder.folder} failed: {err}")
            return None

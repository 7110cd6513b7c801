"""Any-to-any inference for one conversation turn: the interface the demo app and the prompt CLI call.

    assistant = Assistant("ckpt/tiny_chain/stage_3/final")
    reply = assistant.reply("Draw a red bus", mode="chat", on_text=print)
    reply.text, reply.media    # "...", [{"modality": "image", "path": "outputs/image_....png"}]

Input media are encoded by the checkpoint's ImageBind and fill the prompt's one media slot;
several media have their features summed before the input projector, exactly as training
combines a row's media (``data.dataset.record_feature``). (NExT-GPT's
``extract_multimodal_feature`` summed the projected embeddings instead, which differs by the
projector's bias counted once per medium.)

``mode="tool"`` selects a tool as ``cli/inference.py`` does: constrained to the catalogue
(the checkpoint's training data files, or ``catalogue=``), top-k by ``inference.top_k_method``.
``mode="chat"`` generates freely. When a response holds a signal-token run (``[IMG0]..[IMG3]``)
and the checkpoint has output projectors, one more forward over prompt + response reads the
run's last-layer states (the states training aligned; generation's own are not kept),
``ToolLMM.project_runs`` maps them to the decoder's conditioning, and the modality's diffusers
decoder (``toollmm.decoders``) writes the file.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from toollmm.catalogue import AnswerTrie, load_catalogue
from toollmm.checkpoint import load_for_inference
from toollmm.config import resolve_path
from toollmm.data.toolmmbench import MediaRef
from toollmm.decoders import MediaDecoder
from toollmm.generate import beam_top_k, generate_responses, left_pad, rank_tools, score_catalogue
from toollmm.media import MediaError
from toollmm.modalities import MODALITIES
from toollmm.model.toollmm import ToolLMM
from toollmm.output_modalities import OUTPUT_MODALITIES
from toollmm.prompts import IGNORE_INDEX, MODES, STOP_STRING, build_example, parse_answer

log = logging.getLogger(__name__)
_TAG = re.compile(r"<(Image|Audio|Video)>(.*?)</\1>", re.IGNORECASE | re.DOTALL)


@dataclass
class Reply:
    text: str
    """The response, stop string cut and signal tokens removed."""
    tools: list[dict] = field(default_factory=list)
    """``[{"tool": name, "score": float}, ...]`` best first (tool mode, top_k > 1); with top_k 1 the
    parsed tool with score None (or nothing)."""
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
    """A trained checkpoint answering prompts with text, a tool choice, or generated media.

    ``device``/``dtype`` (a torch dtype or "bf16"/"fp16"/"fp32"): default CUDA with the
    checkpoint's ``model.dtype`` when available, else CPU in float32. ``decoders``: modality →
    diffusers folder, over the checkpoint config's ``model.outputs.<modality>.decoder_path``;
    each loads on first use. ``offload`` moves decoder submodules to the GPU only while they
    run (less memory, slower). ``steps``: diffusion steps per generated file.
    ``catalogue``: tool names (a list or a JSON file) for tool mode, instead of the tools of
    the checkpoint's data files. ``llm_path``: the base LLM's folder, if it moved since training.
    """

    def __init__(self, ckpt_dir, device=None, dtype=None, decoders: dict[str, str] | None = None,
                 offload: bool = False, output_dir="outputs", steps: int = 25, max_new_tokens: int = 128,
                 catalogue: Sequence[str] | str | Path | None = None, llm_path: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer, self.config, self.meta = load_for_inference(Path(ckpt_dir), self.device, dtype, llm_path)
        self.decoder_paths = {m: Path(d) for m, d in (decoders or {}).items()}
        unknown = set(self.decoder_paths) - set(OUTPUT_MODALITIES)
        if unknown:
            raise ValueError(f"decoders for {sorted(unknown)}: the output modalities are {list(OUTPUT_MODALITIES)}")
        self.offload, self.output_dir, self.steps, self.max_new_tokens = offload, Path(output_dir), steps, max_new_tokens
        self._catalogue_source = catalogue
        self._trie: AnswerTrie | None = None
        self._encoder = None
        self._features: dict[tuple, torch.Tensor] = {}
        self._decoders: dict[str, MediaDecoder] = {}
        # One turn at a time: a UI may call from several threads, and the lazily built encoder,
        # catalogue and decoders (and the GPU) are shared.
        self._lock = threading.Lock()
        signal = self.model.signal
        self._run_names = (re.compile("|".join(re.escape(n) for n in signal.names if n.startswith("[")))
                           if signal is not None else None)

    # ------------------------------------------------------------------ public

    def reply(self, prompt: str, media: Sequence[tuple[str, str | Path]] = (), mode: str = "chat",
              top_k: int = 1, on_text: Callable[[str], None] | None = None) -> Reply:
        """One answer; ``on_text`` gets the response as it is generated (chat mode; tool mode
        calls it once with the chosen answer)."""
        return self._answer([prompt], [media], mode, top_k, on_text)[0]

    def reply_batch(self, prompts: Sequence[str], media_lists: Sequence[Sequence[tuple[str, str | Path]]] | None = None,
                    mode: str = "chat", top_k: int = 1) -> list[Reply]:
        """Answers for many prompts, generated in one batch (left padded); media files are decoded one by one."""
        media_lists = media_lists if media_lists is not None else [()] * len(prompts)
        if len(media_lists) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(media_lists)} media lists")
        return self._answer(list(prompts), list(media_lists), mode, top_k, None)

    # ------------------------------------------------------------------ prompts

    def _answer(self, prompts, media_lists, mode, top_k, on_text) -> list[Reply]:
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
            replies = self._tools(ids, slot_features, top_k, warnings)
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

    def _catalogue_trie(self, warnings: list[list[str]]) -> AnswerTrie | None:
        if self._trie is None:
            source = self._catalogue_source
            try:
                if source is None:
                    from toollmm.data import load_splits

                    names = load_splits(self.config.data).catalogue
                elif isinstance(source, (str, Path)):
                    names = load_catalogue(Path(source))
                else:
                    names = sorted(set(source))
                self._trie = AnswerTrie(self.tokenizer, names)
            except (OSError, ValueError) as err:
                for notes in warnings:
                    notes.append(f"no tool catalogue ({err}); the answer is free generation, pass catalogue= to constrain it")
                return None
        return self._trie

    def _tools(self, ids, slot_features, top_k, warnings) -> list[Reply]:
        settings, model = self.config.inference, self.model
        trie = self._catalogue_trie(warnings)
        responses = generate_responses(model, self.tokenizer, ids, slot_features, batch_size=len(ids),
                                       max_new_tokens=self.max_new_tokens, temperature=settings.temperature,
                                       top_p=settings.top_p, show_progress=False, constraint=trie)
        ranked = None
        if trie is not None and top_k > 1:
            if settings.top_k_method == "exact":
                ranked = rank_tools(score_catalogue(model, self.tokenizer, ids, slot_features, trie, show_progress=False),
                                    trie, top_k)
            else:
                ranked = beam_top_k(model, self.tokenizer, ids, slot_features, trie, top_k, len(ids), show_progress=False)
        replies = []
        for i, response in enumerate(responses):
            tool = parse_answer(response)
            tools = ranked[i] if ranked is not None else ([{"tool": tool, "score": None}] if tool else [])
            replies.append(Reply(self._visible(response).strip(), tools, tool, [], warnings[i]))
        return replies

    # ------------------------------------------------------------------ chat mode

    def _chat(self, ids, slot_features, warnings, on_text) -> list[Reply]:
        settings = self.config.inference
        input_ids, mask = left_pad(ids, self.tokenizer.pad_token_id)
        present = [e for e in slot_features if e is not None]
        embeds = self.model.embed_inputs(input_ids.to(self.device), torch.stack(present) if present else None)
        sampling = ({"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
                    if settings.temperature > 0 else {"do_sample": False})
        streamer = _TextPieces(self._visible_ids, on_text) if on_text is not None else None
        output = self.model.llm.generate(
            inputs_embeds=embeds, attention_mask=mask.to(self.device), max_new_tokens=self.max_new_tokens,
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

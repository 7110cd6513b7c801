"""Gradio demo: ask a trained checkpoint which tool fits a question plus an image, audio clip or video.

    bash scripts/app.sh                                   # ckpt/tiny/final on http://127.0.0.1:7860
    bash scripts/app.sh --ckpt CKPT --port 7861 --share yes --max-upload-mb 50
    bash scripts/app.sh --ckpt CKPT inference.chat_max_new_tokens=256 inference.top_k_method=exact

Tool mode answers with a tool (a Hugging Face model id, or ``unknown``) and, with top k > 1,
the k most probable tools with their log-probabilities; chat mode answers freely and shows
any image, video or audio the checkpoint's decoders generate. Each message is answered on
its own (the model has no multi-turn memory). The model is loaded once
(``toollmm.assistant.Assistant``, the front-end ``code/inference.py`` also answers through, with
the same ``key=value`` overrides of the checkpoint's ``inference:`` settings) and answers one
request at a time; the page's top k slider sets each request's k.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from toollmm.config import project_root
from toollmm.extras import MissingExtraError, require
from toollmm.output_modalities import OUTPUT_MODALITIES

try:
    gr = require("gradio", "the demo")
except MissingExtraError as err:  # an application module: say what to install, no traceback
    raise SystemExit(str(err)) from None

if TYPE_CHECKING:  # the handlers need only its interface; main() loads the model
    from toollmm.assistant import Assistant, Reply

log = logging.getLogger("toollmm.app")

DEFAULT_CKPT = project_root() / "ckpt" / "tiny" / "final"
ALLOWED_SUFFIXES = {
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"),
    "audio": (".wav", ".flac", ".ogg", ".mp3"),  # what soundfile (libsndfile >= 1.1) decodes
    "video": (".mp4", ".avi", ".mov", ".mkv", ".webm"),
}
MAX_FILES = 4  # each is encoded by ImageBind on every message; their features are summed into one media slot
MB = 1024 * 1024
MODES = [("Tool selection", "tool"), ("Chat", "chat")]
TABLE_HEADERS = ["tool", "log p(answer)"]


class UploadError(ValueError):
    """An upload the model cannot take; the message is shown to the user as is."""


def check_uploads(paths: Sequence[str], max_bytes: int) -> list[tuple[str, str]]:
    """Uploaded file paths -> ``(modality, path)`` pairs, or an UploadError saying what to send instead.

    Gradio's own ``max_file_size`` stops large files in the browser; this check also covers
    clients of the HTTP API, which upload without the browser.
    """
    if len(paths) > MAX_FILES:
        raise UploadError(f"Send at most {MAX_FILES} files per message (got {len(paths)}).")
    media = []
    for path in map(Path, paths):
        modality = next((m for m, suffixes in ALLOWED_SUFFIXES.items() if path.suffix.lower() in suffixes), None)
        if modality is None:
            allowed = "; ".join(f"{m}: {' '.join(s)}" for m, s in ALLOWED_SUFFIXES.items())
            raise UploadError(f"{path.name}: unsupported file type. Upload one of {allowed}.")
        size = path.stat().st_size
        if size > max_bytes:
            raise UploadError(f"{path.name} is {size / MB:.1f} MB; the limit is {max_bytes / MB:.3g} MB.")
        media.append((modality, str(path)))
    return media


def stream_reply(assistant: Assistant, lock: threading.Lock, prompt: str, media, mode: str,
                 top_k: int) -> Iterator[tuple[str, Reply | None]]:
    """``(text so far, None)`` per streamed piece, then ``(text, reply)``; the assistant's error is re-raised.

    ``reply`` runs in a worker thread that hands pieces over a queue, because ``on_text`` is a
    callback while Gradio streams from a generator.
    """
    pieces: queue.Queue = queue.Queue()
    done = object()
    outcome: dict = {}

    def work():
        try:
            with lock:  # a closed browser tab stops the generator, not this thread: keep runs apart
                outcome["reply"] = assistant.reply(prompt, media, mode=mode, top_k=top_k, on_text=pieces.put)
        except Exception as err:  # handed to the generator, which turns it into a message
            outcome["error"] = err
        finally:
            pieces.put(done)

    threading.Thread(target=work, daemon=True).start()
    text = ""
    while (piece := pieces.get()) is not done:
        text += piece
        yield text, None
    if "error" in outcome:
        raise outcome["error"]
    yield text, outcome["reply"]


def _media_update(reply: Reply | None, modality: str):
    path = next((m["path"] for m in reply.media if m["modality"] == modality), None) if reply else None
    return gr.update(value=path, visible=path is not None)


class Demo:
    """The page and its handler around one loaded Assistant."""

    def __init__(self, assistant: Assistant, max_upload_mb: float = 20, title: str = "Tool_LMM"):
        self.assistant = assistant
        self.max_bytes = int(max_upload_mb * MB)
        self.title = title
        self.lock = threading.Lock()

    def respond(self, message: dict, history: list, mode: str, top_k: int):
        """Chat handler: yields (history, textbox, tool, tool table, then one generated file per output
        modality: image, video, audio) as the answer streams.

        Every failure ends as a warning and a line in the chat, never as a traceback in the page.
        """
        history = list(history or [])
        text = (message or {}).get("text", "").strip()
        files = (message or {}).get("files", [])
        if not text:
            gr.Warning("Type a question (a file alone is not a query).")
            yield self._unchanged(history)
            return
        history += [{"role": "user", "content": {"path": path}} for path in files]
        history.append({"role": "user", "content": text})
        try:
            media = check_uploads(files, self.max_bytes)
        except (UploadError, OSError) as err:
            yield self._failed(history, str(err))
            return
        history.append({"role": "assistant", "content": ""})
        no_tool = ("", gr.update(value=[], visible=False))
        try:
            for partial, reply in stream_reply(self.assistant, self.lock, text, media, mode, int(top_k)):
                history[-1] = {"role": "assistant", "content": reply.text if reply else partial}
                if reply is None:
                    yield self._unchanged(history)
        except Exception as err:
            log.exception("reply failed")
            history.pop()
            yield self._failed(history, f"The model could not answer: {err}")
            return
        for warning in reply.warnings:
            gr.Warning(warning)
        rows = [[t["tool"], round(t["score"], 3)] for t in reply.tools if t["score"] is not None]  # none at top k 1
        tool = reply.tool or "(none: the answer names no tool)"
        tool, table = (tool, gr.update(value=rows, visible=bool(rows))) if mode == "tool" else no_tool
        yield history, None, tool, table, *(_media_update(reply, m) for m in OUTPUT_MODALITIES)

    @staticmethod
    def _unchanged(history: list) -> tuple:
        """The outputs while an answer streams: the chat, every other output as it is."""
        return history, gr.skip(), gr.skip(), gr.skip(), *(gr.skip() for _ in OUTPUT_MODALITIES)

    @staticmethod
    def _failed(history: list, message: str):
        """The outputs for a request that got no answer: the message as a warning and in the chat."""
        gr.Warning(message)
        history.append({"role": "assistant", "content": f"⚠️ {message}"})
        hidden = (gr.update(visible=False) for _ in OUTPUT_MODALITIES)
        return history, gr.skip(), "", gr.update(value=[], visible=False), *hidden

    def build(self) -> gr.Blocks:
        accepted = [s for suffixes in ALLOWED_SUFFIXES.values() for s in suffixes]
        with gr.Blocks(title=self.title) as page:
            gr.Markdown(f"## {self.title}\nAsk which tool fits a question, with an optional image, audio clip "
                        f"or video (at most {self.max_bytes / MB:g} MB). Each message is answered on its own.")
            with gr.Row():
                with gr.Column(scale=3):
                    chat = gr.Chatbot(label="Conversation", height=460, elem_id="chat")
                    box = gr.MultimodalTextbox(placeholder="Ask a question, attach a file…", file_types=accepted,
                                               file_count="multiple", show_label=False, elem_id="query")
                with gr.Column(scale=2):
                    mode = gr.Radio(MODES, value="tool", label="Mode", elem_id="mode")
                    top_k = gr.Slider(1, 10, value=5, step=1, label="Top k tools (tool mode)", elem_id="top-k")
                    tool = gr.Textbox(label="Chosen tool", interactive=False, elem_id="tool")
                    table = gr.Dataframe(headers=TABLE_HEADERS, label="Most probable tools", interactive=False,
                                         column_widths=["72%", "28%"], visible=False, elem_id="tools")
                    media = [getattr(gr, entry.display)(label=f"Generated {name}", visible=False, interactive=False)
                             for name, entry in OUTPUT_MODALITIES.items()]
                    gr.ClearButton([chat, box, tool, table, *media])
            box.submit(self.respond, [box, chat, mode, top_k], [chat, box, tool, table, *media])
        return page


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint folder written by training")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", choices=["yes", "no"], default="no", help="yes: a public gradio.live link")
    parser.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted upload")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--decoder", action="append", default=[], metavar="MODALITY=DIR",
                        help="diffusers folder for an output modality (image, video, audio), over the checkpoint "
                             "config's; repeatable")
    parser.add_argument("--offload", action="store_true",
                        help="move decoder parts to the GPU only while they run (less GPU memory, slower)")
    parser.add_argument("--output-dir", type=Path, default=project_root() / "outputs", help="where generated media go")
    parser.add_argument("--steps", type=int, default=25, help="diffusion steps for generated media")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="settings over the checkpoint config's, e.g. inference.chat_max_new_tokens=256")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.ckpt.is_dir():
        raise SystemExit(f"No checkpoint at {args.ckpt}. Train the tiny default first (bash scripts/run_tiny.sh, "
                         "about 15 min on CPU) or pass --ckpt with a folder written by training.")
    from toollmm.assistant import Assistant, parse_decoders  # here: the model code loads only to serve

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        assistant = Assistant.from_checkpoint(args.ckpt, device, args.overrides, decoders=parse_decoders(args.decoder),
                                              offload=args.offload, output_dir=args.output_dir, steps=args.steps)
    except (FileNotFoundError, ValueError) as err:  # not a checkpoint, one for another base model, a bad override
        raise SystemExit(f"Cannot load {args.ckpt}: {err}") from err
    title = f"Tool_LMM: {args.ckpt.parent.name}/{args.ckpt.name} on {device}"
    page = Demo(assistant, args.max_upload_mb, title).build()
    # One model, one request at a time; the rest wait in Gradio's queue.
    page.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share == "yes",
        max_file_size=int(args.max_upload_mb * MB), allowed_paths=[str(Path(args.output_dir).resolve())],
    )

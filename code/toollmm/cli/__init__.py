"""Command-line entry points (``toollmm.cli.console`` holds the installed ``toollmm-*`` scripts).

``run`` starts one as a program, which ``code/<name>.py`` and the console scripts do.
"""

from __future__ import annotations

import gc
import importlib


def run(module: str) -> None:
    """Import ``module`` and call its ``main``, with Python's cyclic garbage collector kept off
    the objects that live until exit. Importing torch, transformers and their dependencies
    leaves about 380k gc-tracked objects, and every full collection walks them all: six during
    the imports of ``inference.py`` (0.5 s) and one at interpreter exit (about 1 s), on a 2-core
    CPU. Skipping those walks took 1.5-1.7 s off a run (``bench/startup_bench.py``). atexit
    handlers and module teardown still run, and what ``main`` creates is collected as usual.
    """
    gc.disable()
    try:
        main = importlib.import_module(module).main
    finally:
        gc.freeze()  # the imported modules: later collections leave them out
        gc.enable()
    try:
        main()
    finally:  # an error exit (bad input, --help) stops the same way
        gc.freeze()  # what main leaves: the collection at interpreter exit would walk it for nothing

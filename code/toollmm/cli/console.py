"""The ``toollmm-*`` console scripts that ``pyproject.toml`` installs, one per entry module.

The modules' ``main`` functions return what they wrote (for tests and callers in Python); a
console script must not hand that to ``sys.exit``, which would print it and exit with 1.
"""

from __future__ import annotations

from collections.abc import Callable

from toollmm.cli import run as run_module


def _console_script(module: str) -> Callable[[], None]:
    def run() -> None:
        run_module(module)

    run.__name__ = run.__qualname__ = module.rsplit(".", 1)[-1]
    return run


train = _console_script("toollmm.cli.train")
infer = _console_script("toollmm.cli.inference")
evaluate = _console_script("toollmm.cli.evaluate")
preprocess = _console_script("toollmm.cli.preprocess_dataset")
import_checkpoint = _console_script("toollmm.cli.import_checkpoint")
extract_features = _console_script("toollmm.cli.extract_features")
process_embeddings = _console_script("toollmm.cli.process_embeddings")
app = _console_script("toollmm.app")

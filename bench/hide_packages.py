"""Run a Python script as if some installed packages were not installed.

    python bench/hide_packages.py sklearn,scipy,pandas,torchao code/inference.py --ckpt ...

For timing in an environment that carries more than this project installs: transformers imports
some optional packages whenever they are present (scikit-learn through its generation code,
torchao through its quantizers), and a machine image may carry them. Each named package is
entered in ``sys.modules`` as ``None``: importing it raises ``ModuleNotFoundError`` and
``importlib.util.find_spec`` returns ``None``, which is how transformers' availability checks see a
package that is absent.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.strip().split("\n\n")[1].strip())
    for name in filter(None, sys.argv[1].split(",")):
        sys.modules[name] = None
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path[0] = str(Path(script).resolve().parent)  # as `python script.py` puts its folder first
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

"""Optional dependencies, grouped as the package's extras (see pyproject.toml).

Training, inference and evaluation need none of them; a feature that does names its extra
when the package is missing, instead of failing on a bare ImportError.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# module → the extra that installs it
EXTRAS = {
    "diffusers": "decoders",
    "av": "decoders",
    "gradio": "demo",
    "matplotlib": "plots",
    "gguf": "small",
    "tensorboard": "tensorboard",
}


class MissingExtraError(ImportError):
    """An optional feature was used without the extra that provides it."""


def install_hint(module: str) -> str:
    extra = EXTRAS[module]
    return f"pip install 'toollmm[{extra}]' (in a clone: pip install -e '.[{extra}]')"


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise MissingExtraError naming the extra, e.g.
    ``require("diffusers", "the image decoder")``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and err.name.split(".")[0] != module:
            raise  # the package is there but one of its own dependencies is broken: show that
        raise MissingExtraError(f"{purpose} needs the {module} package: {install_hint(module)}") from err

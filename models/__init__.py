"""The shipped demo model twins and how model names resolve to paths.

``demo`` is the ``full`` twin (trained on TOFU's 20 forget10 authors and 20 retain authors),
``demo-retain`` the twin never trained on the forget authors. See ``models/build.py`` and BUILD.json.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent
DEMO_MODELS = {"demo": MODELS_DIR / "demo-full", "demo-retain": MODELS_DIR / "demo-retain"}


def resolve_model_path(name: str) -> Path:
    """A model name (``demo``, ``demo-retain``) or a local path to a transformers checkpoint."""
    path = DEMO_MODELS.get(name, Path(name).expanduser())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (give 'demo', 'demo-retain' or a checkpoint folder)")
    return path

"""Writing the JSON reports of the bench, eval and tune commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json_report(path: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` as indented UTF-8 JSON, creating the folder; returns ``path``.

    Non-ASCII stays readable (target names, evasion wrappers in other languages) and values JSON cannot encode
    (paths, dates in configs) are written as their ``str`` rather than failing after a long run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path

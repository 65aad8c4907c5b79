"""GUARD on the reference worker: the ``xargs_processors`` factory twin of our vLLM plugin.

Why here and not only in the plugin: the reference worker stands in for vLLM in CI, so GUARD must run end to end
over HTTP from the same ``vllm_xargs`` a real worker receives. Both read the same flat keys and compile them with
the same ``policies.guard`` code; a target table file named by ``UNLEARN_GUARD_TABLE`` resolves ``guard_target``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.engines.local import LoadedModel
from gateway.errors import BadRequest
from policies.guard import GuardProcessor, tables_from_xargs


def load_guard_table(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"targets": {id: {"tokens": [...], "phrases": [[...]], "mode", "penalty"}}}`` or the bare mapping."""
    path = path or os.environ.get("UNLEARN_GUARD_TABLE")
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    return dict(data.get("targets", data))


class GuardXargs:
    """``(vllm_xargs, model) -> GuardProcessor | None``; a request without ``guard_*`` keys gets None."""

    def __init__(self, table: Mapping[str, Any] | None = None):
        self.table = dict(table) if table is not None else load_guard_table()

    def __call__(self, xargs: Mapping[str, Any], model: LoadedModel) -> GuardProcessor | None:
        try:
            tables = tables_from_xargs(xargs, len(model.tokenizer), self.table, model.device)
        except ValueError as exc:
            raise BadRequest(str(exc), param="vllm_xargs") from exc
        return None if tables is None else GuardProcessor(tables)


__all__ = ["GuardXargs", "load_guard_table"]

"""Forget-target prompt classification: lexical, semantic and learned stages over a whole conversation.

Public interface (imported lazily, so ``import classifiers`` stays cheap for the CLI):
- ``build_index(targets, previous=None) -> TargetIndex``: incremental index build;
- ``TargetIndex.classify(conversation) -> Decision``: blocking classification;
- ``Classifier(index)``: async micro-batching front, ``await classifier.classify(messages)``;
- ``Decision``, ``ClassifierConfig``, ``load_encoder``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from classifiers.batching import Classifier, classify_batch
    from classifiers.encoder import load_encoder
    from classifiers.index import ClassifierConfig, Decision, TargetIndex, build_index

_EXPORTS = {"build_index": "classifiers.index", "TargetIndex": "classifiers.index", "Decision": "classifiers.index",
            "ClassifierConfig": "classifiers.index", "Classifier": "classifiers.batching",
            "classify_batch": "classifiers.batching", "load_encoder": "classifiers.encoder"}

__all__ = ["Classifier", "ClassifierConfig", "Decision", "TargetIndex", "build_index", "classify_batch", "load_encoder"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(name)

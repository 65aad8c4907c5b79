"""Fill the classifier's on-disk caches ahead of serving: ``python -m classifiers.warm``.

Why: exporting MiniLM to int8 ONNX, distilling its static token table (the encoder gate) and embedding the
generic negatives take seconds on a fast CPU and minutes on a slow one, and every process that finds them
missing recomputes them before it answers. ``make install`` and the gateway image's build step both run this,
so a first server (or test) starts from warm caches (``UNLEARN_CACHE_DIR``).
"""

from __future__ import annotations


def warm_caches() -> str:
    """Build every cached artefact of the default encoder; a one-line summary of what is ready."""
    from classifiers.encoder import load_encoder
    from classifiers.index import build_index
    from classifiers.static import static_embedder

    encoder = load_encoder()
    window = encoder.encode(["warm up"]).shape
    static = static_embedder(encoder) is not None
    generic = build_index([], encoder=encoder).generic_vectors.shape
    return f"encoder caches ready: {encoder.name} {window}, static table {static}, generic negatives {generic}"


if __name__ == "__main__":
    print(warm_caches())

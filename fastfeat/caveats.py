"""One-line caveats printed beside results (extract's summary, serve's start-up line and /v1/model,
probe's report), worded once so every command says the same thing."""

from __future__ import annotations

RANDOM_WEIGHTS_NOTE = "random:SEED weights: meaningless features, for tests and trying the pipeline only, not for use"


def is_random_weights(weights: dict | str | None) -> bool:
    """Whether a weights identity (metadata's {"source", "random", ...}) or a --weights value is random."""
    if isinstance(weights, dict):
        return bool(weights.get("random")) or str(weights.get("source", "")).startswith("random:")
    return isinstance(weights, str) and weights.startswith("random:")


def random_weights_note(weights: dict | str | None) -> str | None:
    return RANDOM_WEIGHTS_NOTE if is_random_weights(weights) else None

"""Is pretraining learning? Accuracy against its chance level, code use, masked fraction, and warnings.

Every pretraining objective reports, per batch and on dev data:

- ``accuracy``: how often the masked frames' targets are predicted (wav2vec 2.0: the true quantised
  vector scores highest among itself and the distractors; BEST-RQ: the arg-max of the head is the label);
- ``chance``: the accuracy of a model that learned nothing (wav2vec 2.0: the mean over masked frames of
  ``1 / (1 + distractors)``, counting only distractors whose code differs from the target's, so
  ``1 / (1 + num_negatives)`` when codes are diverse and 1 when they collapsed; BEST-RQ: the share of
  the most frequent label, the best constant guess);
- ``code_perplexity``: ``exp(entropy)`` of the hard code histogram per codebook, averaged over
  codebooks (1 = every frame gets the same code);
- ``masked_fraction``: masked valid frames over valid frames.

:func:`health_warnings` turns them into the two warnings a run logs once each: accuracy within
:data:`ACCURACY_FACTOR` x chance once a second warm-up's worth of steps at the full rate has passed
(at the end of the warm-up itself every objective measured here was still near chance), and code
perplexity below :func:`collapse_threshold` from the end of the warm-up.
"""

from __future__ import annotations

from typing import Any

# Accuracy below this multiple of chance after the warm-up counts as "not learning".
ACCURACY_FACTOR = 1.5
# Code perplexity below this share of the codebook's entries (and never below 2 codes) counts as collapsed.
COLLAPSE_SHARE = 0.005
HEALTH_KEYS = ("accuracy", "chance", "code_perplexity", "masked_fraction")


def collapse_threshold(entries: int) -> float:
    """The code perplexity under which a codebook of ``entries`` counts as collapsed."""
    return max(2.0, COLLAPSE_SHARE * entries)


def health_summary(metrics: dict[str, float], entries: int) -> dict[str, Any] | None:
    """The health block of ``summary.json`` from the latest metrics: dev values (``dev_`` keys) when
    there are dev metrics, else the latest training averages; ``None`` when the metrics hold none."""
    for source, prefix in (("dev", "dev_"), ("train", "")):
        if all(prefix + k in metrics for k in HEALTH_KEYS):
            values = {k: float(metrics[prefix + k]) for k in HEALTH_KEYS}
            chance = values["chance"]
            return {"source": source, **values,
                    "accuracy_over_chance": values["accuracy"] / chance if chance > 0 else float("inf"),
                    "codebook_entries": entries, "collapse_below": collapse_threshold(entries)}
    return None


def health_warnings(health: dict[str, Any], step: int, warmup_steps: int) -> list[tuple[str, str]]:
    """``(kind, message)`` pairs for ``health`` (a :func:`health_summary`) at ``step``.

    Kinds: ``"chance"`` (accuracy below ``ACCURACY_FACTOR`` x chance, checked from ``2 * warmup_steps``)
    and ``"collapse"`` (code perplexity below the collapse threshold, checked from ``warmup_steps``).
    """
    if step < warmup_steps:
        return []
    found = []
    where = f"{health['source']} at step {step}"
    if step >= 2 * warmup_steps and health["accuracy"] < ACCURACY_FACTOR * health["chance"]:
        found.append(("chance", f"pretraining is not learning: {where} accuracy {health['accuracy']:.4f} is "
                                f"within {ACCURACY_FACTOR:g}x its chance level {health['chance']:.4f}"))
    if health["code_perplexity"] < health["collapse_below"]:
        found.append(("collapse", f"codes collapsed: {where} code perplexity {health['code_perplexity']:.2f} "
                                  f"of {health['codebook_entries']} entries per codebook (below "
                                  f"{health['collapse_below']:.2f})"))
    return found

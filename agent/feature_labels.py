"""Feature labels for feature circuits: which circuit features still need a label, and the ``feature_labels`` tool
that reads the labels back, committed or still waiting in the run's outbox.

A feature-circuit work item explains a behaviour *through* the labels of its features, so the run labels the
circuit's unlabelled features first (ordinary feature items, listed before it: :func:`unlabelled`) and the item reads
their final labels with ``feature_labels``. The labels a run writes wait in its outbox until the next group commit
(:mod:`autoexplain.agent.store.outbox`); when a label the tool is asked for belongs to a feature item of this run that
finished but is not committed yet, the tool commits the finished items first (what a reader announcing itself gets
too), so it always reads this run's own writes.

Caveat: a label is association-level evidence about the feature (what it fires on); the feature's *effect* on the
behaviour is what the circuit measured. An explanation written through labels is only as good as both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from autoexplain.agent.state import FINISHED, stable_id
from autoexplain.tools.errors import InputError
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec
from autoexplain.tools.vocab import CausalLevel

if TYPE_CHECKING:
    from autoexplain.agent.store import Store
    from autoexplain.agent.store.outbox import Outbox


def labelled_elsewhere(store: Store, targets: Sequence[str], run_id: str) -> set[str]:
    """The features among ``targets`` (``SAE_ID#INDEX``) with a final label written by another run than
    ``run_id``. Labels this run writes do not count: which features a run labels is fixed by what was stored
    before it started, so a resumed run lists the same items."""
    from autoexplain.agent.store import queries

    return queries.targets_labelled_elsewhere(store, targets, run_id)


def _final_labels(store: Store, targets: Sequence[str]) -> dict[str, tuple[str, float | None]]:
    """target -> (final label, its best correctness) from the store, the newest final label of each target."""
    from autoexplain.agent.store import queries

    return queries.final_labels_of(store, targets)


class FeatureLabelsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: list[str] = Field(min_length=1, max_length=100, description="features as SAE_ID#INDEX (the node "
                                                                          "keys feature_circuit lists)")


class FeatureLabel(BaseModel):
    feature: str
    label: str | None = Field(description="the final label; None: the feature has none yet")
    correctness: float | None = Field(default=None, description="the label's best stored correctness")


class FeatureLabelsOut(ToolOutput):
    labels: list[FeatureLabel]

    def summary_text(self) -> str:
        lines = [f"- {x.feature}: " + (f"{x.label!r}" + ("" if x.correctness is None
                                                          else f" (correctness {x.correctness:.2f})")
                                      if x.label is not None else "no label yet")
                 for x in self.labels]
        return "\n".join(["final labels (association-level: what each feature fires on):", *lines])


def feature_labels_spec(store: Store, out: Outbox, run_id: str) -> ToolSpec:
    """The ``feature_labels`` tool bound to a run's store and outbox."""

    def fn(ctx: ToolContext, args: FeatureLabelsIn) -> FeatureLabelsOut:
        targets = list(dict.fromkeys(f.strip().split("@")[0] for f in args.features))
        for t in targets:
            sae_id, sep, index = t.rpartition("#")
            if not sep or not index.isdigit():
                raise InputError(f"feature {t!r}: write SAE_ID#INDEX, e.g. {next(iter(ctx.saes), 'res0')}#12")
        found = _final_labels(store, targets)
        finished = {s.value for s in FINISHED}
        waiting = [t for t in targets if t not in found and (out.get(
            "work_items", (stable_id("item", run_id, "feature", t),)) or {}).get("status") in finished]
        if waiting:  # labelled by this run, not committed yet: commit the finished items, then read again
            out.try_flush()
            found = _final_labels(store, targets)
        return FeatureLabelsOut(labels=[FeatureLabel(feature=t, label=found[t][0] if t in found else None,
                                                     correctness=found[t][1] if t in found else None)
                                        for t in targets])

    return ToolSpec(name="feature_labels", level=CausalLevel.ASSOCIATION, input_model=FeatureLabelsIn,
                    output_model=FeatureLabelsOut, fn=fn, cost=Cost.CHEAP,
                    description="The final labels of features (SAE_ID#INDEX, e.g. the feature nodes of "
                                "feature_circuit) with their correctness; 'no label yet' for a feature nobody "
                                "labelled. Association-level evidence about what each feature fires on.")

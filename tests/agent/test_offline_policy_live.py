"""The offline policy's reading of ``feature_examples``: dead means density 0, nothing else (issue 12, part 3).

A store split before rare features kept an activating window on the explain side can still show a live feature
with no activating example. The policy must not call it dead: it drafts an explicit "live, not labelled" text.
These run the policy's own steps on real ``feature_examples`` outputs (no store needed for the rule itself).
"""

from __future__ import annotations

from autoexplain.agent.agent_tools import FeatureExamplesOut, ShownExample
from autoexplain.agent.policies.offline import OfflinePolicy
from autoexplain.agent.state import ItemKind, ToolRequest, ToolResult, WorkItem


def _item() -> WorkItem:
    return WorkItem(item_id="item-1", run_id="run-1", kind=ItemKind.FEATURE, target="sae-x#3",
                    params={"sae_id": "sae-x", "feature_index": 3})


def _result(*, density: float, examples: list[ShownExample], n_hidden: int) -> ToolResult:
    out = FeatureExamplesOut(sae_id="sae-x", feature_index=3, density=density, max_act=2.0 if density else 0.0,
                             n_tokens=5000, is_dead=density == 0, examples=examples, n_hidden=n_hidden)
    return ToolResult(call_id="call-1", request=ToolRequest(tool="feature_examples", args={}), summary=out.summary(),
                      output=out)


QUIET = ShownExample(kind="random", max_act=0.0, tokens=["the", " cat"], acts=[0.0, 0.0])


def _run(res: ToolResult) -> list[str]:
    policy, item = OfflinePolicy(), _item()
    step = policy.observe({}, item, [res])
    state = {"notes": step.notes, "calls": [res.call_id]}
    assert not policy.plan(state, item).requests  # nothing more to read or probe
    return [(d.text, d.dead) for d in policy.propose(state, item).drafts]


def test_a_live_feature_without_explain_side_firing_is_not_dead() -> None:
    drafts = _run(_result(density=0.0004, examples=[QUIET], n_hidden=3))
    assert len(drafts) == 1
    text, dead = drafts[0]
    assert not dead and "dead" not in text and "not labelled" in text and "0.0004" in text


def test_a_feature_with_density_zero_is_dead() -> None:
    drafts = _run(_result(density=0.0, examples=[QUIET], n_hidden=0))
    assert drafts == [("dead feature: never fired in 5000 harvested tokens", True)]


def test_a_single_explain_side_window_is_labelled_from() -> None:
    one = ShownExample(kind="top", max_act=1.5, tokens=["the", " owl", " sat"], acts=[0.0, 1.5, 0.0])
    policy, item = OfflinePolicy(), _item()
    step = policy.observe({}, item, [_result(density=0.0002, examples=[one, QUIET], n_hidden=2)])
    assert not step.notes.get("dead") and not step.notes.get("unreadable")
    assert step.notes["listed"] == ["owl"] and any("'owl'" in h.text for h in step.hypotheses)

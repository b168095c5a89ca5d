"""Plans mean what they say: the run budget's omitted limits are unlimited, the item budget keeps its defaults."""

from __future__ import annotations

from autoexplain.agent.runner import Plan
from autoexplain.agent.state import Usage


def _plan(**extra: object) -> Plan:
    return Plan.model_validate({"model": "toy:small", "items": [{"label": {"sae": "toy:small/res0",
                                                                          "features": "0-3"}}], **extra})


def test_run_budget_fields_left_out_are_unlimited() -> None:
    plan = _plan(run_budget={"seconds": 36000})
    assert (plan.run_budget.steps, plan.run_budget.llm_tokens, plan.run_budget.seconds) == (None, None, 36000)
    # 10,000 steps and 10 M tokens into a ten-hour run: nothing but the clock can stop it
    assert plan.run_budget.exceeded(Usage(steps=10_000, prompt_tokens=10_000_000, seconds=100.0)) is None
    assert plan.run_budget.exceeded(Usage(seconds=36_000.0)) == "seconds"


def test_item_budget_keeps_its_defaults_and_the_run_budget_defaults_to_unlimited() -> None:
    plan = _plan()
    assert plan.budget.steps == 40 and plan.budget.llm_tokens == 200_000
    assert plan.run_budget.exceeded(Usage(steps=10**9, prompt_tokens=10**12, seconds=10.0**9)) is None


def test_errors_in_plans_built_from_flags_name_the_flags() -> None:
    """A command builds a plan from its flags; a bad value is reported as the flag the user typed."""
    import pytest

    from autoexplain.agent.cli.common import plan_from
    from autoexplain.tools.errors import InputError

    base = {"model": "toy:tiny", "items": [{"label": {"sae": "toy:tiny/res0"}}]}
    with pytest.raises(InputError, match=r"^--max-steps: .*greater than or equal to 1 \(got 0\)"):
        plan_from({**base, "budget": {"steps": 0}})
    with pytest.raises(InputError, match=r"^--tokens: "):
        plan_from({**base, "items": [{"label": {"sae": "toy:tiny/res0", "tokens": 0}}]})
    with pytest.raises(InputError, match=r"^--llm-timeout: "):
        plan_from({**base, "llm": {"timeout_s": -1}})

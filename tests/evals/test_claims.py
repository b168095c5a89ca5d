"""Mechanistic claims read from explanation text and checked by interventions (planted induction model)."""

from __future__ import annotations

import pytest

from autoexplain.evals.claims import check_claims, parse_claims, verified_share
from autoexplain.tools.heads import HeadRole

pytestmark = pytest.mark.usefixtures("one_thread")

TRUE_TEXT = ("induction: 7 of 110 edges carry the behaviour. a0.0 is a previous-token head (score 0.97); its output "
             "feeds a1.1's key (K-composition 2.0x baseline); a1.1 is an induction head (0.94) that attends to the "
             "token after the earlier occurrence of the current token and copies it (copying 0.90).")


def test_the_offline_phrasing_and_prose_variants_are_parsed():
    got = {(c.kind, c.node, c.role.value if c.role else str(c.edge)) for c in parse_claims(TRUE_TEXT)}
    assert got == {("role", "a0.0", "previous_token"), ("edge", "a1.1", "a0.0->a1.1.k"),
                   ("role", "a1.1", "induction"), ("role", "a1.1", "copying")}
    prose = parse_claims("The name mover a1.0 copies names; a0.1's output feeds a1.2's key. a1.2 suppresses the "
                         "repeated name, and a1.3 is not an induction head. a1.2's value reads a0.3.")
    got = {(c.node, c.role.value if c.role else str(c.edge)) for c in prose}
    assert got == {("a1.0", "copying"), ("a1.2", "a0.1->a1.2.k"), ("a1.2", "suppression"), ("a1.2", "a0.3->a1.2.v")}
    assert parse_claims("Nodes: a1.1 (alone +100% of the effect; feeds logits).") == []


def test_true_claims_verify_and_false_ones_do_not():
    from autoexplain.evals.truth.planted_circuits import induction_and
    from autoexplain.tools.patching import PatchSetup

    pc = induction_and()
    setup = PatchSetup(pc.lm, pc.task)
    checks = check_claims(pc.lm, setup, parse_claims(TRUE_TEXT))
    assert [c.verified for c in checks] == [True] * 4, [(c.claim.node, c.claim.role, c.why) for c in checks]
    assert verified_share(checks) == 1.0
    false = check_claims(pc.lm, setup, parse_claims("a0.2 is an induction head; its output feeds a1.1's key. "
                                                    "a1.3 is a previous-token head."))
    assert {(c.claim.node, c.claim.role) for c in false} == {("a0.2", HeadRole.INDUCTION), ("a1.1", None),
                                                             ("a1.3", HeadRole.PREVIOUS_TOKEN)}
    by = {(c.claim.node, c.claim.role): c for c in false}
    assert by["a0.2", HeadRole.INDUCTION].verified is False and by["a1.1", None].verified is False
    # a last-layer head's previous-token claim has no downstream reader to intervene on: unchecked, with a reason,
    # and counted as not verified
    assert by["a1.3", HeadRole.PREVIOUS_TOKEN].verified is None and by["a1.3", HeadRole.PREVIOUS_TOKEN].why
    assert verified_share(false) == 0.0
    assert verified_share([]) is None

"""Mechanistic claims in a circuit explanation, read from its text and each checked by an intervention.

A circuit explanation that says *how* ("a0.0 is a previous-token head; its output feeds a1.1's key; a1.1 is an
induction head that copies the attended token") makes claims a circuit's faithfulness does not test: the edges
may be right while the roles are wrong. Each claim here is read from the text, whoever wrote it (the offline
policy's fixed phrasing or an LLM's prose), and checked by its own intervention:

* **Role claims** "``aL.H`` is a *role* head" (roles of :class:`~autoexplain.tools.heads.HeadRole`:
  previous-token, duplicate-token, induction, copying, suppression, attends-to-BOS; "copies" and "suppresses"
  count as the copying and suppression roles). Checked by :func:`autoexplain.tools.heads.verify_role`: e.g. an
  induction claim holds when patching the head's key input from a run whose first half is shuffled breaks its
  induction attention; a copying claim when ablating the head lowers the logit of the token it attends to.
* **Composition claims** "``aA.B`` feeds ``aC.D``'s query / key / value" (also "``aC.D``'s key reads ``aA.B``").
  Checked on the task itself: noising that one edge (``aA.B->aC.D.k``) in the otherwise clean model must move the
  metric by at least ``min_effect`` of the full effect (necessity of the edge, intervention level).

The share of claims verified is part of the explanation's correctness (:func:`verified_share`); a claim whose
check cannot run counts as unverified, and the reason is kept. Caveats: reading claims from prose is lexical — a
claim phrased in a way the patterns below do not recognise is not checked (and not counted), so the parsed claims
are stored with the score for anyone to audit; a negated sentence ("a1.0 is not an induction head") is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, Field

from autoexplain.tools.errors import InputError
from autoexplain.tools.heads import HeadRole, verify_role
from autoexplain.tools.vocab import Edge

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.patching import PatchSetup

#: An edge claim holds when noising the edge alone moves the metric by at least this share of |m(M) - m(∅)|.
DEFAULT_MIN_EFFECT = 0.05

_NODE = r"(a\d+\.\d+|m\d+)"  # a head or an MLP (the source of a composition claim)
_DST = r"(a\d+\.\d+)"  # a head: composition claims name the head input a source feeds
#: Role phrases (lower-case text) -> role. Order matters only for overlapping phrases: longer first.
_ROLE_PHRASES: tuple[tuple[str, HeadRole], ...] = (
    (r"negative[- ]copying", HeadRole.SUPPRESSION),
    (r"previous[- ]token", HeadRole.PREVIOUS_TOKEN),
    (r"duplicate[- ]token", HeadRole.DUPLICATE_TOKEN),
    (r"induction", HeadRole.INDUCTION),
    (r"suppress(?:ion|es|ing)?", HeadRole.SUPPRESSION),
    (r"cop(?:ying|ies)", HeadRole.COPYING),
    (r"attends? to (?:the )?bos|bos[- ]attending|attention sink", HeadRole.ATTENDS_BOS),
)
_PORTS = {"query": "q", "key": "k", "value": "v", "q": "q", "k": "k", "v": "v"}
_FEEDS = re.compile(rf"(?<![\w.]){_NODE}(?:'s)?\W+(?:output\s+)?(?:feeds|composes\s+with|writes\s+into)\s+{_DST}'s\s+"
                    r"(query|key|value)\b")
_READS = re.compile(rf"(?<![\w.]){_DST}'s\s+(query|key|value)\s+reads\s+{_NODE}(?![\w.])")
_ITS_FEEDS = re.compile(rf"its\s+output\s+feeds\s+{_DST}'s\s+(query|key|value)\b")
_MENTION = re.compile(rf"(?<![\w.]){_NODE}(?![\w])")


class Claim(BaseModel):
    """One checkable claim read from an explanation."""

    kind: Literal["role", "edge"]
    node: str = Field(description="the head the claim is about (for an edge claim: the receiving head)")
    role: HeadRole | None = None
    edge: Edge | None = None
    text: str = Field(description="the sentence it was read from")


class ClaimCheck(BaseModel):
    claim: Claim
    verified: bool | None = Field(description="None: the check could not run (reason in why)")
    effect: float | None = None
    method: str
    why: str = ""


def _sentences(text: str) -> list[str]:
    # split on ';' and on sentence ends, but not on the dots inside node names (a1.2) or numbers (0.94)
    return [s.strip() for s in re.split(r";|(?<![0-9a-z])\.(?!\d)|\.(?=\s|$)", text) if s.strip()]


def parse_claims(text: str) -> list[Claim]:
    """Every role and composition claim in ``text`` (deduplicated, in order of appearance)."""
    out: dict[tuple[str, str], Claim] = {}
    subject: str | None = None  # the node the previous clause was about ("its output" refers to it)

    def edge(src: str, dst: str, port: str, sent: str) -> None:
        e = Edge.parse(f"{src}->{dst}.{_PORTS[port]}")
        out.setdefault(("edge", str(e)), Claim(kind="edge", node=dst, edge=e, text=sent))

    for sent in _sentences(text):
        low = sent.lower()
        mentions = list(_MENTION.finditer(low))
        prev_subject, subject = subject, (mentions[0][1] if mentions else subject)
        for m in _FEEDS.finditer(low):
            edge(m[1], m[2], m[3], sent)
        for m in _READS.finditer(low):
            edge(m[3], m[1], m[2], sent)
        its = _ITS_FEEDS.search(low)
        if its:
            src = mentions[0][1] if mentions and mentions[0].start() < its.start() else prev_subject
            if src is not None:
                edge(src, its[1], its[2], sent)
        heads = [h for h in mentions if h[1].startswith("a")]
        if not heads:
            continue
        # a role phrase belongs to the nearest head mentioned before it in the sentence (or the first head, when
        # the phrase comes first: "the induction head a1.1"); "not"/"no" between them negates it
        for pattern, role in _ROLE_PHRASES:
            for rm in re.finditer(pattern, low):
                before = [h for h in heads if h.end() <= rm.start()]
                head = before[-1] if before else heads[0]
                between = low[min(head.end(), rm.start()):max(head.start(), rm.start())]
                if re.search(r"\bnot\b|\bno\b|n't", between):
                    continue
                node = head[1]
                out.setdefault((node, role.value), Claim(kind="role", node=node, role=role, text=sent))
    return list(out.values())


def check_claims(lm: LoadedModel, setup: PatchSetup, claims: Sequence[Claim], *,
                 min_effect: float = DEFAULT_MIN_EFFECT, seed: int = 0) -> list[ClaimCheck]:
    """Check each claim by its intervention: role claims with :func:`verify_role` on the model, edge claims by
    noising the edge alone on ``setup``'s task (batched). A head the model does not have is unverified."""
    out: list[ClaimCheck] = []
    g = setup.graph
    edge_claims = [c for c in claims if c.kind == "edge" and c.edge is not None and str(c.edge) in g.index]
    values = setup.evaluate_many(torch.stack([g.mask([g.index[str(c.edge)]]) for c in edge_claims])
                                 ) if edge_claims else []
    moved = {str(c.edge): setup.m_clean - v for c, v in zip(edge_claims, values, strict=True)}
    for c in claims:
        if c.kind == "edge":
            assert c.edge is not None
            if str(c.edge) not in moved:
                out.append(ClaimCheck(claim=c, verified=False, method="edge noising",
                                      why=f"{c.edge} is not an edge of this model's graph"))
                continue
            share = moved[str(c.edge)] / setup.effect if setup.effect else 0.0
            out.append(ClaimCheck(claim=c, verified=abs(share) >= min_effect, effect=share,
                                  method=f"noise {c.edge} alone ({setup.ablation.value}); holds when it moves "
                                         f"{setup.metric.value} by >= {min_effect:g} of m(M)-m(∅)"))
            continue
        assert c.role is not None
        try:
            chk = verify_role(lm, c.node, c.role, seed=seed)
        except InputError as exc:
            out.append(ClaimCheck(claim=c, verified=False, method="verify_role", why=exc.message))
            continue
        out.append(ClaimCheck(claim=c, verified=chk.verified, effect=chk.effect, method=chk.method,
                              why="" if chk.verified is not None else str(chk.details.get("reason", ""))))
    return out


def verified_share(checks: Sequence[ClaimCheck]) -> float | None:
    """The share of claims verified (a check that could not run counts as not verified); None without claims."""
    if not checks:
        return None
    return sum(1 for c in checks if c.verified) / len(checks)

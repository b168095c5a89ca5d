"""The shared vocabulary: string forms round-trip, malformed names are refused (never ignored)."""

from __future__ import annotations

import pytest

from autoexplain.tools.errors import InputError
from autoexplain.tools.vocab import Edge, FeatureRef, Node, Site, SiteKind


@pytest.mark.parametrize("text", ["embed->a1.2.q", "a0.3->a1.2.k", "a1.2->logits", "m0->m1", "embed->m0",
                                  "a0.0->a1.3.v", "m1->logits"])
def test_edges_round_trip(text: str) -> None:
    assert str(Edge.parse(text)) == text


@pytest.mark.parametrize("text", ["a0.3->a1.2", "m0->m1.q", "logits->m1", "a0->m1", "x->y", "a0.3-a1.2.k",
                                  "m0->embed"])
def test_malformed_edges_are_refused(text: str) -> None:
    with pytest.raises(InputError, match="malformed edge"):
        Edge.parse(text)


def test_nodes_and_features() -> None:
    n = Node(name="a3.7")
    assert (n.layer, n.head, n.is_head) == (3, 7, True)
    assert (Node(name="m2").layer, Node(name="m2").head) == (2, None)
    assert Node(name="embed").layer is None
    assert str(FeatureRef(sae_id="sae-abc", index=12)) == "sae-abc#12"
    with pytest.raises(ValueError):
        Node(name="a3")


def test_sites() -> None:
    assert Site.parse("head_out.1.2") == Site(kind=SiteKind.HEAD_OUT, layer=1, head=2)
    assert str(Site(kind=SiteKind.RESID_POST, layer=0)) == "resid_post.0"
    with pytest.raises(ValueError):
        Site(kind=SiteKind.RESID_POST, layer=0, head=1)
    with pytest.raises(InputError):
        Site.parse("resid_post.-1")

"""The shared vocabulary: string forms round-trip, malformed names are refused (never ignored)."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

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


class _Uses(BaseModel):
    site: Site
    edges: list[Edge]
    node: Node | None = None
    feature: FeatureRef | None = None


def test_typed_values_serialise_to_their_string_forms() -> None:
    """Pydantic dumps a vocabulary value as its string form and reads it back from it: the JSON of tool outputs,
    cached outputs and LLM tool arguments stay strings."""
    raw = {"site": "head_out.1.2", "edges": ["embed->a1.2.q", "a0.3->a1.2.k", "m1->logits"], "node": "a1.2",
           "feature": "sae-abc#12"}
    m = _Uses.model_validate(raw)
    assert m.site == Site(kind=SiteKind.HEAD_OUT, layer=1, head=2)
    assert m.edges[1] == Edge(src=Node(name="a0.3"), dst=Node(name="a1.2"), qkv="k")
    assert m.node == Node(name="a1.2") and m.feature == FeatureRef(sae_id="sae-abc", index=12)
    assert m.model_dump() == raw and json.loads(m.model_dump_json()) == raw
    assert _Uses.model_validate_json(m.model_dump_json()) == m
    assert _Uses.model_validate(m.model_dump()) == m
    # instances pass through as they are
    assert _Uses(site=m.site, edges=m.edges).edges[0] is m.edges[0]


def test_typed_values_have_string_json_schemas() -> None:
    props = _Uses.model_json_schema()["properties"]
    assert props["site"] == {"title": "Site", "type": "string"}
    assert props["edges"] == {"items": {"type": "string"}, "title": "Edges", "type": "array"}
    assert "$defs" not in _Uses.model_json_schema()


def test_typed_values_equal_and_hash_like_their_strings() -> None:
    e = Edge.parse("a0.3->a1.2.k")
    assert e == "a0.3->a1.2.k" and "a0.3->a1.2.k" == e and e != "a0.3->a1.2.q"
    assert e in {"a0.3->a1.2.k"} and "a0.3->a1.2.k" in {e}
    assert {e: 1}["a0.3->a1.2.k"] == 1
    assert Site.parse("resid_pre.0") == "resid_pre.0" and hash(Site.parse("resid_pre.0")) == hash("resid_pre.0")
    assert Node(name="m0") != Site.parse("resid_pre.0")


@pytest.mark.parametrize(("field", "bad", "needle"), [("site", "blocks.0.hook_resid_pre", "unknown site"),
                                                       ("edges", ["a0.3->a1.2"], "malformed edge"),
                                                       ("node", "a3", "unknown node"),
                                                       ("feature", "sae-abc", "malformed feature")])
def test_malformed_strings_are_validation_errors(field: str, bad: object, needle: str) -> None:
    ok = {"site": "resid_pre.0", "edges": []}
    with pytest.raises(ValidationError, match=needle):
        _Uses.model_validate({**ok, field: bad})


def test_feature_refs_round_trip() -> None:
    ref = FeatureRef.parse("gpt2-small-res-jb/blocks.8.hook_resid_pre#123")
    assert (ref.sae_id, ref.index) == ("gpt2-small-res-jb/blocks.8.hook_resid_pre", 123)
    assert str(ref) == "gpt2-small-res-jb/blocks.8.hook_resid_pre#123"
    with pytest.raises(ValueError):
        FeatureRef(sae_id="s", index=-1)

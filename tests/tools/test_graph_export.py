"""Attribution-graph export (circuit-tracer / Neuronpedia JSON): a feature circuit and a head-level circuit export
to graphs that pass the format check, node ids follow the conventions, and broken graphs fail the check."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from autoexplain.evals.truth.planted_feature_circuits import A, V, build
from autoexplain.tools.errors import InputError
from autoexplain.tools.feature_circuits import find_feature_circuit
from autoexplain.tools.graph_export import (
    ExportLink,
    ExportNode,
    ExportPrompt,
    build_graph,
    cantor,
    check_graph,
    write_graph,
)

PROMPT = ExportPrompt(text="<0> <1> <5> <6> <9>", tokens=["<0>", "<1>", "<5>", "<6>", "<9>"],
                      token_ids=[0, 1, 5, 6, 9], answer="<10>", answer_id=10, answer_prob=0.9)


@pytest.fixture(scope="module")
def feature_graph() -> dict[str, Any]:
    pc = build(n_prompts=6)
    fc = find_feature_circuit(pc.lm, pc.task, pc.saes)
    layer = {s.sae_id: s.site.layer for s in pc.saes}
    nodes = [ExportNode(key=n.key, kind=n.node.kind.value, layer=layer.get(n.node.sae_id or ""), index=n.node.index,
                        position=n.node.position, label=None, effect=n.effect, activation=n.activation)
             for n in fc.kept()] + [ExportNode(key="logits", kind="logits")]
    links = [ExportLink(src=e.src, dst=e.dst, weight=e.weight) for e in fc.circuit_edges()]
    return build_graph(slug="planted-fc", scan="autoexplain:planted", prompt=PROMPT, nodes=nodes, links=links,
                       n_layers=2, effect=fc.effect)


def test_feature_circuit_graph_follows_the_conventions(feature_graph: dict[str, Any]) -> None:
    assert check_graph(feature_graph) == []
    ids = {n["node_id"]: n for n in feature_graph["nodes"]}
    # summed nodes are drawn at the answer position (the last token)
    assert set(ids) == {"E_9_4", f"0_{A}_4", f"1_{V}_4", "3_10_4"}
    feat = ids[f"0_{A}_4"]
    assert feat["feature"] == cantor(0, A) and feat["layer"] == "0" and feat["feature_type"] == "cross layer transcoder"
    assert feat["jsNodeId"] == f"0_{A}-0" and feat["influence"] == pytest.approx(1.0)
    logit = ids["3_10_4"]
    assert logit["is_target_logit"] and logit["feature_type"] == "logit" and logit["clerp"].startswith('Output "<10>"')
    assert ids["E_9_4"]["layer"] == "E" and ids["E_9_4"]["feature"] == 4
    links = {(lk["source"], lk["target"]): lk["weight"] for lk in feature_graph["links"]}
    assert links[(f"0_{A}_4", f"1_{V}_4")] == pytest.approx(3.0, abs=1e-5) and len(links) == 3


def test_head_circuit_graph_and_error_nodes() -> None:
    nodes = [ExportNode(key="embed", kind="embed"), ExportNode(key="a0.0", kind="head", layer=0, index=0),
             ExportNode(key="a1.1", kind="head", layer=1, index=1, label="a1.1 (attention head): induction"),
             ExportNode(key="m1", kind="mlp", layer=1, index=4), ExportNode(key="sae#err", kind="error", layer=1,
                                                                            position=2),
             ExportNode(key="logits", kind="logits")]
    links = [ExportLink(src="embed", dst="a0.0", weight=0.5), ExportLink(src="a0.0", dst="a1.1", weight=1.0),
             ExportLink(src="a0.0", dst="a1.1", weight=0.5),  # a0.0->a1.1.k and .v: one link, summed
             ExportLink(src="a1.1", dst="logits", weight=2.0), ExportLink(src="m1", dst="logits", weight=0.1),
             ExportLink(src="sae#err", dst="logits", weight=0.2)]
    g = build_graph(slug="heads", scan="autoexplain:m", prompt=PROMPT, nodes=nodes, links=links, n_layers=2)
    assert check_graph(g) == []
    ids = {n["node_id"] for n in g["nodes"]}
    assert {"0_0_4", "1_1_4", "1_4_4", "1_-1_2", "E_9_4", "3_10_4"} == ids
    assert {(lk["source"], lk["target"]): lk["weight"] for lk in g["links"]}[("0_0_4", "1_1_4")] == 1.5
    with pytest.raises(InputError, match="names a node"):
        build_graph(slug="x", scan="s", prompt=PROMPT, nodes=nodes, n_layers=2,
                    links=[ExportLink(src="a9.9", dst="logits", weight=1.0)])
    with pytest.raises(InputError, match="logits"):
        build_graph(slug="x", scan="s", prompt=PROMPT, nodes=nodes[:-1], links=[], n_layers=2)


def _broken(g: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []

    def variant(name: str, fn: Any) -> None:
        b = copy.deepcopy(g)
        fn(b)
        out.append((name, b))

    variant("missing metadata field", lambda b: b["metadata"].pop("prompt_tokens"))
    variant("layer as int", lambda b: b["nodes"][0].update(layer=0))
    variant("duplicate id", lambda b: b["nodes"].append(copy.deepcopy(b["nodes"][0])))
    variant("dangling link", lambda b: b["links"].append({"source": "E_9_4", "target": "7_7_7", "weight": 1.0}))
    variant("ctx out of range", lambda b: [n.update(ctx_idx=9) for n in b["nodes"] if n["layer"] == "E"])
    variant("not cantor", lambda b: [n.update(feature=n["feature"] + 1) for n in b["nodes"]
                                     if n["feature_type"] == "cross layer transcoder"])
    variant("bad feature type", lambda b: b["nodes"][0].update(feature_type="neuron"))
    variant("no target logit", lambda b: [n.update(is_target_logit=False) for n in b["nodes"]])
    variant("bad id", lambda b: [n.update(node_id="x" + n["node_id"]) for n in b["nodes"] if n["layer"] == "E"])
    variant("no qParams", lambda b: b.pop("qParams"))
    variant("weight not a number", lambda b: b["links"][0].update(weight="1"))
    return out


def test_broken_graphs_fail_the_check(feature_graph: dict[str, Any]) -> None:
    for name, g in _broken(feature_graph):
        assert check_graph(g), f"the check accepted a graph with {name}"


def test_write_graph_and_index(feature_graph: dict[str, Any], tmp_path: Path) -> None:
    path = write_graph(feature_graph, tmp_path / "out")
    assert path.name == "planted-fc.json" and check_graph(json.loads(path.read_text())) == []
    write_graph(feature_graph, tmp_path / "out")  # the same slug again: replaced, not duplicated
    index = json.loads((tmp_path / "out" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["planted-fc"]
    broken = copy.deepcopy(feature_graph)
    broken["links"].append({"source": "nope", "target": "E_9_4", "weight": 1.0})
    with pytest.raises(InputError, match="format check"):
        write_graph(broken, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

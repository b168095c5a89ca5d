"""Circuits as attribution-graph JSON, the format circuit-tracer writes and its graph UI and Neuronpedia read.

The format (circuit-tracer's ``frontend/graph_models.py`` and ``utils/create_graph_files.py``): one JSON file per
graph, ``{"metadata", "qParams", "nodes", "links"}``.

* ``metadata``: ``slug``, ``scan`` (which dictionaries), ``transcoder_list``, ``prompt_tokens`` (the displayed
  prompt, one string per token), ``prompt``, ``node_threshold``, ``schema_version``.
* ``qParams``: the UI state: ``pinnedIds``, ``supernodes``, ``linkType``, ``clickedId``, ``sg_pos``.
* ``nodes``: ``node_id``, ``feature``, ``layer`` (a string), ``ctx_idx`` (token position), ``feature_type``,
  ``token_prob``, ``is_target_logit``, ``run_idx``, ``reverse_ctx_idx``, ``jsNodeId``, ``clerp`` (the label shown),
  ``influence``, ``activation``. Node ids follow the conventions: a feature ``{layer}_{index}_{pos}`` (``feature``
  = the Cantor pairing of layer and index, ``jsNodeId`` ``{layer}_{index}-0``); an error node
  ``{layer}_-1_{pos}`` (``feature`` -1, type ``mlp reconstruction error``); a token ``E_{token_id}_{pos}`` (layer
  ``E``, ``feature`` = pos, type ``embedding``); a logit ``{n_layers + 1}_{token_id}_{pos}`` (type ``logit``).
* ``links``: ``{source, target, weight}`` between node ids.

How autoexplain's circuits map onto it
--------------------------------------
* Feature circuits: a feature of an SAE at layer L is a ``cross layer transcoder`` node (the type the UIs draw for
  dictionary features) at layer L; when two SAEs share a layer (``attn_out.1`` and ``mlp_out.1``), the later
  one's indices are offset by the earlier one's width (``metadata.info.feature_offsets`` says by how much). Error
  terms are error nodes; ``embed`` is the token node; ``logits`` is the answer's logit node. A transcoder's
  features (``ExportNode.transcoder``) are what that node type means in circuit-tracer (features read at the MLP
  input, written to its output; its error node is the ``mlp reconstruction error`` of that MLP): the transcoder's
  ids are listed in ``metadata.transcoder_list``, and ``metadata.info.dictionaries`` says, per dictionary id,
  whether it is a ``transcoder`` or an ``sae`` (whose features the UIs draw with the same node type).
* Head-level circuits: ``a{L}.{H}`` is a node at layer L with index H, ``m{L}`` one at layer L with index
  ``n_heads``; edges into a head's q, k and v inputs become one link whose weight is their sum.
* Positions: the graph shows one prompt (the task's first). Per-position nodes keep their position; nodes summed
  over positions (and every node of a head-level circuit, whose edges are not per position) are drawn at the
  answer position, and ``metadata.info.positions`` says so. Link weights are the circuit's edge weights (metric
  units), not circuit-tracer's normalised direct effects; ``influence`` is |effect| / |m(M) - m(∅)|.

:func:`check_graph` checks a graph against the fields above (types, unique ids, id conventions, positions inside
the prompt, links between existing nodes, one target logit) and returns the problems found.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from autoexplain.tools.errors import InputError

SCHEMA_VERSION = 1
FEATURE_TYPES = ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")


def cantor(x: int, y: int) -> int:
    """The Cantor pairing circuit-tracer uses for a feature's ``feature`` number: ``(x + y)(x + y + 1)/2 + y``."""
    return (x + y) * (x + y + 1) // 2 + y


# ============================================================================= input
class ExportNode(BaseModel):
    """A circuit node as the exporter needs it."""

    key: str = Field(description="autoexplain's node key (embed, SAE_ID#12, SAE_ID#err, a1.2, m0, logits)")
    kind: Literal["embed", "feature", "error", "head", "mlp", "logits"]
    layer: int | None = None
    index: int | None = Field(default=None, description="feature index, head index")
    position: int | None = Field(default=None, description="None: summed over positions (drawn at the answer)")
    label: str | None = None
    effect: float | None = None
    activation: float | None = None
    transcoder: bool = Field(default=False, description="a feature or error node of a transcoder (read at its input "
                                                        "site, written at its output site), not of an SAE")


class ExportLink(BaseModel):
    src: str
    dst: str
    weight: float


class ExportPrompt(BaseModel):
    """The prompt the graph is drawn on: its text, tokens (strings and ids) and the answer."""

    text: str
    tokens: list[str]
    token_ids: list[int]
    answer: str
    answer_id: int
    answer_prob: float = 0.0


# ============================================================================= output
def build_graph(*, slug: str, scan: str, prompt: ExportPrompt, nodes: Sequence[ExportNode],
                links: Sequence[ExportLink], n_layers: int, effect: float | None = None,
                node_threshold: float | None = None, offsets: Mapping[str, int] | None = None,
                info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The attribution-graph JSON (a dict) of a circuit's nodes and links drawn on ``prompt``."""
    if not prompt.tokens or len(prompt.tokens) != len(prompt.token_ids):
        raise InputError("the display prompt has no tokens (or tokens and ids differ in number)")
    last = len(prompt.tokens) - 1
    ids: dict[str, str] = {}
    out_nodes: list[dict[str, Any]] = []
    offsets = dict(offsets or {})

    def add(node: ExportNode, node_id: str, feature: int, layer: str, pos: int, ftype: str, js: str,
            clerp: str, **extra: Any) -> None:
        ids[node.key] = node_id
        if any(n["node_id"] == node_id for n in out_nodes):
            return
        influence = None if effect in (None, 0) or node.effect is None else abs(node.effect) / abs(effect)
        out_nodes.append({"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos,
                          "feature_type": ftype, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                          "reverse_ctx_idx": 0, "jsNodeId": js, "clerp": clerp, "influence": influence,
                          "activation": node.activation, **extra})

    for n in nodes:
        pos = n.position if n.position is not None else last
        if not 0 <= pos <= last:
            raise InputError(f"node {n.key} sits at position {pos}, outside the {last + 1}-token display prompt")
        if n.kind == "embed":
            tid = prompt.token_ids[pos]
            add(n, f"E_{tid}_{pos}", pos, "E", pos, "embedding", f"E_{tid}-{pos}",
                n.label or f"token {prompt.tokens[pos]!r}")
        elif n.kind == "logits":
            layer = str(n_layers + 1)
            add(n, f"{layer}_{prompt.answer_id}_{last}", prompt.answer_id, layer, last, "logit",
                f"L_{prompt.answer_id}-{last}", f'Output "{prompt.answer}" (p={prompt.answer_prob:.3f})',
                )
        elif n.kind == "error":
            assert n.layer is not None
            add(n, f"{n.layer}_-1_{pos}", -1, str(n.layer), pos, "mlp reconstruction error", f"{n.layer}_-1-{pos}",
                n.label or n.key)
        else:
            assert n.layer is not None and n.index is not None
            idx = n.index + offsets.get(n.key.partition("#")[0], 0)
            add(n, f"{n.layer}_{idx}_{pos}", cantor(n.layer, idx), str(n.layer), pos, "cross layer transcoder",
                f"{n.layer}_{idx}-0", n.label or n.key)
    if not any(n.kind == "logits" for n in nodes):
        raise InputError("a graph needs the logits node")
    for row in out_nodes:
        if row["feature_type"] == "logit":
            row["is_target_logit"] = True
            row["token_prob"] = float(prompt.answer_prob)
    merged: dict[tuple[str, str], float] = {}
    for link in links:
        if link.src not in ids or link.dst not in ids:
            raise InputError(f"link {link.src} -> {link.dst} names a node the graph does not have")
        key = (ids[link.src], ids[link.dst])
        if key[0] == key[1]:
            continue
        merged[key] = merged.get(key, 0.0) + float(link.weight)
    dictionaries = {n.key.partition("#")[0]: "transcoder" if n.transcoder else "sae" for n in nodes
                    if n.kind in ("feature", "error")}
    transcoders = sorted(k for k, v in dictionaries.items() if v == "transcoder")
    meta = {"slug": slug, "scan": scan, "transcoder_list": transcoders, "prompt_tokens": list(prompt.tokens),
            "prompt": prompt.text, "node_threshold": node_threshold, "schema_version": SCHEMA_VERSION,
            "info": {"generator": "autoexplain", "feature_offsets": offsets, "dictionaries": dictionaries,
                     **(info or {})}}
    return {"metadata": meta,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": out_nodes,
            "links": [{"source": s, "target": t, "weight": w} for (s, t), w in merged.items()]}


def write_graph(graph: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``{slug}.json`` into ``out_dir`` and add its metadata to ``graph-metadata.json`` (the index the
    circuit-tracer server lists graphs from; an entry with the same slug is replaced). Refuses a graph that fails
    :func:`check_graph`."""
    problems = check_graph(graph)
    if problems:
        raise InputError(f"the graph fails the format check: {problems[0]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = str(graph["metadata"]["slug"])
    path = out_dir / f"{slug}.json"
    path.write_text(json.dumps(graph, indent=1), encoding="utf-8")
    index = out_dir / "graph-metadata.json"
    entries: list[Any] = []
    if index.exists():
        try:
            entries = list(json.loads(index.read_text(encoding="utf-8")).get("graphs", []))
        except (json.JSONDecodeError, AttributeError):
            entries = []
    meta = {k: v for k, v in graph["metadata"].items() if k != "info"}
    entries = [e for e in entries if e.get("slug") != slug] + [meta]
    index.write_text(json.dumps({"graphs": entries}, indent=1), encoding="utf-8")
    return path


# ============================================================================= the format check
class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Metadata(_Strict):
    slug: StrictStr = Field(min_length=1)
    scan: StrictStr
    transcoder_list: list[StrictStr]
    prompt_tokens: list[StrictStr] = Field(min_length=1)
    prompt: StrictStr
    node_threshold: float | None = None
    schema_version: StrictInt | None = 1


class _QParams(_Strict):
    pinnedIds: list[StrictStr]
    supernodes: list[list[StrictStr]]
    linkType: StrictStr
    clickedId: StrictStr
    sg_pos: StrictStr


class _Node(_Strict):
    node_id: StrictStr
    feature: StrictInt
    layer: StrictStr
    ctx_idx: StrictInt
    feature_type: Literal["cross layer transcoder", "mlp reconstruction error", "embedding", "logit"]
    token_prob: StrictFloat | StrictInt = 0.0
    is_target_logit: StrictBool = False
    run_idx: StrictInt = 0
    reverse_ctx_idx: StrictInt = 0
    jsNodeId: StrictStr
    clerp: StrictStr = ""
    influence: StrictFloat | StrictInt | None = None
    activation: StrictFloat | StrictInt | None = None


class _Link(_Strict):
    source: StrictStr
    target: StrictStr
    weight: StrictFloat | StrictInt


class _Graph(_Strict):
    metadata: _Metadata
    qParams: _QParams
    nodes: list[_Node]
    links: list[_Link]


_ID = {"cross layer transcoder": re.compile(r"^(\d+)_(\d+)_(\d+)$"),
       "mlp reconstruction error": re.compile(r"^(\d+)_-1_(\d+)$"),
       "embedding": re.compile(r"^E_(\d+)_(\d+)$"),
       "logit": re.compile(r"^(\d+)_(\d+)_(\d+)$")}


def check_graph(data: Any) -> list[str]:
    """The problems of an attribution-graph JSON value against the format (empty: it conforms)."""
    try:
        g = _Graph.model_validate(data)
    except ValidationError as exc:
        return [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:10]]
    problems: list[str] = []
    n_tokens = len(g.metadata.prompt_tokens)
    seen: set[str] = set()
    layers: list[int] = []
    for i, n in enumerate(g.nodes):
        where = f"nodes.{i} ({n.node_id})"
        if n.node_id in seen:
            problems.append(f"{where}: duplicate node_id")
        seen.add(n.node_id)
        if not 0 <= n.ctx_idx < n_tokens:
            problems.append(f"{where}: ctx_idx {n.ctx_idx} outside the {n_tokens} prompt tokens")
        m = _ID[n.feature_type].match(n.node_id)
        if not m:
            problems.append(f"{where}: node_id does not follow the {n.feature_type!r} convention")
            continue
        if int(m.groups()[-1]) != n.ctx_idx:
            problems.append(f"{where}: the node_id's position is not ctx_idx {n.ctx_idx}")
        if n.feature_type == "embedding":
            if n.layer != "E":
                problems.append(f"{where}: embedding nodes have layer 'E'")
        elif not n.layer.isdigit() or n.layer != m.group(1):
            problems.append(f"{where}: layer {n.layer!r} does not match the node_id")
        else:
            layers.append(int(n.layer))
        if n.feature_type == "cross layer transcoder" and n.feature != cantor(int(m.group(1)), int(m.group(2))):
            problems.append(f"{where}: feature is not the Cantor pairing of layer and index")
        if n.feature_type == "mlp reconstruction error" and n.feature != -1:
            problems.append(f"{where}: error nodes have feature -1")
        for name in ("influence", "activation", "token_prob"):
            v = getattr(n, name)
            if v is not None and not math.isfinite(float(v)):
                problems.append(f"{where}: {name} is not finite")
    logits = [n for n in g.nodes if n.feature_type == "logit"]
    if not logits:
        problems.append("no logit node")
    elif sum(n.is_target_logit for n in logits) != 1:
        problems.append("exactly one logit node must be the target logit")
    top = max(layers, default=0)
    for n in logits:
        if n.layer.isdigit() and int(n.layer) != top:
            problems.append(f"logit node {n.node_id} is not on the last layer")
    for i, link in enumerate(g.links):
        if link.source not in seen or link.target not in seen:
            problems.append(f"links.{i}: {link.source} -> {link.target} names a node that does not exist")
        if not math.isfinite(float(link.weight)):
            problems.append(f"links.{i}: weight is not finite")
    return problems


def display_prompt(lm: Any, task: Any, row: int = 0) -> ExportPrompt:
    """Prompt ``row`` of a tokenised task as the graph's display prompt: its clean tokens, the first answer, and
    the answer's probability under ``lm`` (a :class:`~autoexplain.tools.models.LoadedModel`)."""
    import torch

    n = int(task.seq_lens[row])
    ids = [int(t) for t in task.clean[row, :n]]
    answer = int(task.answers[row, 0])
    with torch.no_grad():
        logits = lm.model(task.clean[row:row + 1, :n].to(lm.device))[0, -1].float()
    prob = float(logits.softmax(-1)[answer])
    return ExportPrompt(text=task.prompts.prompts[row].clean, tokens=lm.token_strs(ids), token_ids=ids,
                        answer=lm.token_str(answer), answer_id=answer, answer_prob=prob)

"""What a circuit page computes with the model at report time: attention patterns and a logit lens.

The database keeps the circuit, not the model's activations, so the attention heatmaps of the circuit's heads and the
logit-lens grid are computed when the report is built, through the same public tools the agent calls
(:func:`autoexplain.tools.heads.attention_patterns`, :func:`autoexplain.tools.lens.logit_lens`), on the first
prompts of the circuit's task file. Both are association-level views (what a head attends to, what the residual
stream decodes to), not evidence that a component matters. When the model spec stored with the run does not load
here (a hub model offline, a folder that moved) or the task file is gone, the page says why instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel

#: Prompts of the task file shown, heads shown at most, positions of the logit lens at most (the tool's limit).
N_PROMPTS, MAX_HEADS, MAX_POSITIONS = 2, 6, 32


@dataclass
class AttentionMap:
    head: str
    prompt: str
    tokens: list[str]
    weights: list[list[float | None]]  #: [query][key]; None above the diagonal (a causal head cannot attend)


@dataclass
class LensGrid:
    prompt: str
    answer: str | None
    rows: list[str]  #: residual sites, first layer first
    tokens: list[str]
    top_tokens: list[list[str]]  #: [row][position] the top decoded token
    top_probs: list[list[float | None]]
    answer_probs: list[float | None]  #: per row: the answer's probability at the last position


@dataclass
class ModelViews:
    attention: list[AttentionMap] = field(default_factory=list)
    lens: list[LensGrid] = field(default_factory=list)
    note: str | None = None  #: why something could not be computed


class Models:
    """Loads each model spec once per report (a failure is remembered as its reason)."""

    def __init__(self, preloaded: Mapping[str, LoadedModel] | None = None) -> None:
        self._got: dict[str, LoadedModel | str] = dict(preloaded or {})

    def get(self, spec: str) -> LoadedModel | str:
        if spec not in self._got:
            from autoexplain.tools.loading import load_model

            try:
                self._got[spec] = load_model(spec)
            except Exception as exc:  # any failure to load is reported on the page, never fatal to the report
                self._got[spec] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return self._got[spec]


def circuit_views(models: Models, spec: str | None, model_id: str, task_file: str | None, heads: list[str]
                  ) -> ModelViews:
    """Attention maps of ``heads`` and a logit lens on the first prompts of ``task_file``, with model ``spec``
    (only when what loads under ``spec`` now is the model ``model_id`` the circuit was found on)."""
    if spec is None:
        return ModelViews(note="the database does not record which model spec this circuit's model was loaded from")
    if not task_file:
        return ModelViews(note="the circuit records no task file, so there are no prompts to run")
    from autoexplain.tools.data import load_task_file
    from autoexplain.tools.errors import InputError

    lm = models.get(spec)
    if isinstance(lm, str):
        return ModelViews(note=f"model {spec!r} does not load here ({lm}): attention and logit lens not computed")
    if lm.model_id != model_id:
        return ModelViews(note=f"model {spec!r} loads here as {lm.model_id}, but the circuit was found on {model_id} "
                               "(rebuilt or changed since): attention and logit lens not computed")
    try:
        prompts = load_task_file(task_file).prompts[:N_PROMPTS]
    except (InputError, OSError) as exc:
        return ModelViews(note=f"task file {task_file!r} does not load here ({exc}): attention and logit lens not "
                               "computed")
    views = ModelViews()
    notes = []
    for p in prompts:
        try:
            views.attention += _attention(lm, p.clean, heads)
        except InputError as exc:
            notes.append(f"attention on {p.clean!r}: {exc.message}")
        try:
            views.lens.append(_lens(lm, p.clean, p.answers[0] if p.answers else None))
        except InputError as exc:
            notes.append(f"logit lens on {p.clean!r}: {exc.message}")
    views.note = "; ".join(notes) or None
    return views


def _attention(lm: LoadedModel, text: str, heads: list[str]) -> list[AttentionMap]:
    from autoexplain.tools.heads import attention_patterns
    from autoexplain.tools.vocab import Node

    if not heads:
        return []
    ids = [int(i) for i in lm.to_tokens(text, prepend_bos=True, truncate=False)[0].tolist()]
    n = len(ids)
    out = attention_patterns(lm, [(text, ids)], heads=[Node.parse(h) for h in heads[:MAX_HEADS]],
                             positions=list(range(n)), top_k=n)
    (pa,) = out.prompts
    maps: dict[str, AttentionMap] = {}
    for q in pa.queries:
        name = str(q.head)
        m = maps.setdefault(name, AttentionMap(name, text, list(pa.tokens), [[None] * n for _ in range(n)]))
        for k in range(q.query_position + 1):
            m.weights[q.query_position][k] = 0.0
        for a in q.top:
            m.weights[q.query_position][a.position] = a.weight
    return list(maps.values())


def _lens(lm: LoadedModel, text: str, answer: str | None) -> LensGrid:
    from autoexplain.tools.errors import InputError
    from autoexplain.tools.lens import LogitLensIn, logit_lens
    from autoexplain.tools.registry import ToolContext

    ctx = ToolContext(model=lm)
    n = len(lm.to_tokens(text, prepend_bos=True, truncate=False)[0])
    positions = list(range(-min(n, MAX_POSITIONS), 0))  # from the end: the tool resolves them per text
    try:
        out = logit_lens(ctx, LogitLensIn(texts=[text], targets=[answer] if answer else [], positions=positions,
                                          top_k=1))
    except InputError:
        if not answer:
            raise
        answer = None  # the answer is not one token: the grid without its probability
        out = logit_lens(ctx, LogitLensIn(texts=[text], positions=positions, top_k=1))
    readings = out.readings
    rows = [str(s) for s in out.sites]
    top_tokens = [[r.layers[i].top[0].token for r in readings] for i in range(len(rows))]
    top_probs: list[list[float | None]] = [[r.layers[i].top[0].prob for r in readings] for i in range(len(rows))]
    last = readings[-1]
    answer_probs: list[float | None] = [layer.targets[0].prob if layer.targets else None for layer in last.layers]
    return LensGrid(text, answer, rows, [r.token for r in readings], top_tokens, top_probs, answer_probs)

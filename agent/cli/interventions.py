"""``autoexplain ablate``, ``steer``, ``lens`` and ``dla``: the intervention and lens tools from the terminal.

Each command builds the tool's own pydantic input (so the CLI, Python and the LLM agent share one validation),
checks every flag and the model and SAE specs *before* anything loads, then calls the tool through the registry
(:class:`~autoexplain.tools.registry.Registry`, against a :class:`~autoexplain.tools.registry.ToolContext`) and
prints its full output as tables: the tokens whose probability moved most (ablate, steer), what every layer's
residual stream decodes to (lens), each head's, MLP's and bias's direct contribution to a logit (dla).

They write nothing unless ``--db`` is given; then the call is recorded as a run of kind ``tool``: the model and
SAE (with the spec typed, so ``autoexplain show feature SPEC#N`` finds it), one ``tool_calls`` row with the
arguments and the summary, and the full output in ``tool_cache`` under the same key the agent's calls use.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from autoexplain.agent.cli.common import DeviceOpt, Fmt, ModelOpt, console, open_store
from autoexplain.tools.errors import InputError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from autoexplain.tools.probe import InterventionEffect
    from autoexplain.tools.registry import ToolOutput

SaeOpt = Annotated[str, typer.Option("--sae", "-s", help="sae-lens dir, toy:MODEL/NAME or RELEASE/ID")]
TextOpt = Annotated[list[str], typer.Option("--text", "-t", help="a text to run (repeatable)")]
WriteDbOpt = Annotated[Path | None, typer.Option("--db", help="record the call in this DuckDB file (default: "
                                                              "write nothing)")]
FormatOpt = Annotated[Fmt, typer.Option("--format", "-o", help="table (default) or json (the tool's full "
                                                               "output)")]
BosOpt = Annotated[bool, typer.Option("--bos/--no-bos", help="prepend the BOS token (position 0 is then BOS)")]

#: The tool input's field -> the flag a user typed, for one-line errors.
_FLAGS = {"features": "--feature", "feature": "--feature", "texts": "--text", "scale": "--scale/--value",
          "top_k": "--top-k", "targets": "--target", "target": "--target", "baseline": "--baseline",
          "positions": "--position", "position": "--position", "top_n": "--top-n", "mode": "--scale/--value"}


# ============================================================================= shared
def parse_features(values: list[str]) -> list[int]:
    """``--feature 7 --feature 9,12`` -> [7, 9, 12]; one line for anything that is not a feature index."""
    out: list[int] = []
    for v in values:
        for part in v.split(","):
            p = part.strip()
            if not p.isdigit():
                raise InputError(f"--feature {v!r}: feature indices are non-negative integers (e.g. --feature 7 or "
                                 "--feature 7,9)")
            out.append(int(p))
    if not out:
        raise InputError("give at least one --feature")
    return out


def _tool_input(tool: str, fields: dict[str, Any]) -> BaseModel:
    """The tool's validated input (a pydantic error is one line naming the flag)."""
    from pydantic import ValidationError

    from autoexplain.tools.registry import default_registry

    spec = default_registry().get(tool)
    try:
        return spec.input_model.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "arguments"
        where = _FLAGS.get(field, "--" + field.replace("_", "-"))
        raise InputError(f"{where}: {err['msg']}") from None


def _check_db(db: Path | None) -> None:
    """Refuse a ``--db`` that cannot be written before the model loads (the store repeats these checks)."""
    if db is None:
        return
    if db.is_dir():
        raise InputError(f"--db {str(db)!r} is a directory: pass a file path such as results.duckdb")
    if not db.parent.is_dir():
        raise InputError(f"--db {str(db)!r}: folder {str(db.parent)!r} does not exist; create it or pass a path in an "
                         "existing folder")


def _prepare(model: str, sae: str | None, db: Path | None) -> None:
    """Everything checkable without weights: the specs (paths exist, hold a model / an SAE) and ``--db``."""
    from autoexplain.tools.loading import check_specs

    _check_db(db)
    check_specs(model, [sae] if sae else [])


def _call(tool: str, fields: dict[str, Any], *, model: str, sae: str | None, device: str | None,
          db: Path | None) -> ToolOutput:
    """Load the model (and SAE), call ``tool`` through the registry, and record the call when ``db`` is given."""
    from autoexplain.tools.loading import load_model, load_sae
    from autoexplain.tools.registry import ToolContext, default_registry

    lm = load_model(model, device=device, sae_specs=[sae] if sae else ())
    saes = {}
    if sae:
        s = load_sae(sae, lm)
        saes[s.sae_id] = s
        fields = {**fields, "sae_id": s.sae_id}
    reg = default_registry()
    args = reg.parse_args(tool, fields)
    t0 = time.monotonic()
    out = reg.get(tool).fn(ToolContext(model=lm, saes=saes), args)
    if db is not None:
        _record(db, tool, args, out, time.monotonic() - t0, lm, list(saes.values()), model, sae)
    return out


def _record(db: Path, tool: str, args: BaseModel, out: ToolOutput, seconds: float, lm: Any, saes: list[Any],
            model: str, sae: str | None) -> None:
    """One run of kind ``tool``: model and SAE rows, the call's ``tool_calls`` row, its output in ``tool_cache``."""
    from autoexplain.agent.store.caches import cache_key
    from autoexplain.agent.store.rows import utc_now

    store = open_store(db)
    run_id = f"tool-{uuid.uuid4().hex[:10]}"
    args_json = args.model_dump(mode="json")
    key = cache_key(lm.model_id, [s.sae_id for s in saes], tool, args_json)
    call_id = f"call-{uuid.uuid4().hex[:12]}"
    store.start_run(run_id, "tool", {"tool": tool, "model": model, "sae": sae, "args": args_json})
    store.record_model_and_saes(lm, saes)
    now = utc_now()
    store.upsert_many({
        "tool_calls": [{"call_id": call_id, "run_id": run_id, "item_id": None, "tool": tool, "args": args_json,
                        "summary": out.summary(), "error": None, "duration_s": round(seconds, 4),
                        "cache_key": key, "created_at": now}],
        "tool_cache": [{"cache_key": key, "tool": tool, "output": out.model_dump_json(), "created_at": now}]})
    store.finish_run(run_id, "done", {"tool": tool, "call_id": call_id})
    console(stderr=True).print(f"recorded: run {run_id}, tool call {call_id} in {store.path.resolve()}",
                               markup=False, highlight=False)


def _no_csv(format: Fmt) -> None:
    if format is Fmt.csv:
        raise InputError("--format csv is not available for this command: use table or json")


def _json_out(out: ToolOutput) -> None:
    print(out.model_dump_json(indent=1))


def _run(tool: str, fields: dict[str, Any], *, model: str, sae: str | None, device: str | None, db: Path | None,
         format: Fmt) -> ToolOutput | None:
    """One command's whole call: flags checked (format, the tool's input model, specs and ``--db``) before any
    weights load, then the tool called through the registry. With ``--format json`` the full output is printed and
    None returned; otherwise the output is returned for the command to print."""
    _no_csv(format)
    _tool_input(tool, fields)
    _prepare(model, sae, db)
    out = _call(tool, fields, model=model, sae=sae, device=device, db=db)
    if format is Fmt.json:
        _json_out(out)
        return None
    return out


def _effects(con: Any, items: list[InterventionEffect], what: str) -> None:
    """Per text: the change in loss and KL, the KL at every token, and the tokens that rose and fell most."""
    from rich.table import Table

    for e in items:
        con.print()
        con.print(f"text {e.text!r}", markup=False, highlight=False)
        dl = "n/a (one token)" if e.delta_loss is None else f"{e.delta_loss:+.4g} (clean {e.loss_clean:.4g} -> " \
                                                            f"{what} {e.loss_edited:.4g})"
        at = "nothing changed" if e.kl_max_position is None else \
            f"largest at position {e.kl_max_position} ({e.tokens[e.kl_max_position]!r})"
        con.print(f"  next-token loss change {dl}; KL(clean || {what}) mean {e.kl_mean:.4g}, max {e.kl_max:.4g}, {at}",
                  markup=False, highlight=False)
        con.print("  KL per position: " + " ".join(f"{t!r}:{k:.3g}" for t, k in zip(e.tokens, e.kl_per_position,
                                                                                    strict=False)),
                  markup=False, highlight=False)
        if not e.rose and not e.fell:
            con.print("  no token's probability moved", markup=False)
            continue
        t = Table("rose", "p before", "p after", "change", "fell", "p before", "p after", "change",
                  title=f"token probabilities ({e.shifts_at})")
        for i in range(max(len(e.rose), len(e.fell))):
            r = e.rose[i] if i < len(e.rose) else None
            f = e.fell[i] if i < len(e.fell) else None
            cells: list[str] = []
            for s in (r, f):
                cells += ["", "", "", ""] if s is None else [repr(s.token), f"{s.p_before:.4g}", f"{s.p_after:.4g}",
                                                             f"{s.delta:+.4g}"]
            t.add_row(*cells)
        con.print(t)


# ============================================================================= ablate
def ablate(model: ModelOpt, sae: SaeOpt,
           feature: Annotated[list[str], typer.Option("--feature", "-F", help="feature index to zero; repeatable "
                                                                               "or comma-separated (zeroed together)")],
           text: TextOpt,
           top_k: Annotated[int, typer.Option("--top-k", help="tokens listed per direction")] = 5,
           bos: BosOpt = True, db: WriteDbOpt = None, device: DeviceOpt = None, format: FormatOpt = Fmt.table) -> None:
    """Zero SAE features at every position (the SAE spliced in with its error term, so nothing else changes) and
    show per text how the next-token distribution moved: change in loss, KL per position, and the tokens whose
    probability fell and rose most where the KL peaks. Intervention-level evidence (tool ablate_feature)."""
    fields = {"sae_id": "-", "features": parse_features(feature), "texts": text, "top_k": top_k, "prepend_bos": bos}
    out: Any = _run("ablate_feature", fields, model=model, sae=sae, device=device, db=db, format=format)
    if out is None:  # --format json: printed
        return
    con = console()
    con.print(f"ablating features {', '.join(map(str, out.features))} of {sae} ({out.sae_id}) at every position "
              "(zero; SAE spliced with its error term)", markup=False, highlight=False)
    _effects(con, out.items, "ablated")


# ============================================================================= steer
def steer(model: ModelOpt, sae: SaeOpt,
          feature: Annotated[int, typer.Option("--feature", "-F", help="the feature index to steer with")],
          text: TextOpt,
          scale: Annotated[float | None, typer.Option("--scale", help="add SCALE to the feature's activation "
                                                                      "(adds SCALE x W_dec[feature])")] = None,
          value: Annotated[float | None, typer.Option("--value", help="clamp the feature's activation to VALUE "
                                                                      "instead")] = None,
          top_k: Annotated[int, typer.Option("--top-k", help="tokens listed per direction")] = 5,
          bos: BosOpt = True, db: WriteDbOpt = None, device: DeviceOpt = None, format: FormatOpt = Fmt.table) -> None:
    """Add to one SAE feature's activation at every position (--scale), or clamp it (--value), and show per text
    which tokens' probabilities rose and fell most (averaged over positions), the KL and the change in loss.
    Large values are off-distribution: compare with the feature's max activation (autoexplain show feature)."""
    if (scale is None) == (value is None):
        raise InputError("give --scale (add to the activation) or --value (clamp it), exactly one")
    if feature < 0:
        raise InputError(f"--feature must be a non-negative index, got {feature}")
    fields = {"sae_id": "-", "feature": feature, "texts": text, "top_k": top_k, "prepend_bos": bos,
              "scale": scale if scale is not None else value, "mode": "add" if scale is not None else "clamp"}
    out: Any = _run("steer_feature", fields, model=model, sae=sae, device=device, db=db, format=format)
    if out is None:  # --format json: printed
        return
    how = f"adding {out.scale:g} x W_dec[{out.feature}]" if out.mode == "add" else \
        f"clamping feature {out.feature} to {out.scale:g}"
    console().print(f"steering {sae} ({out.sae_id}): {how} at every position", markup=False, highlight=False)
    _effects(console(), out.items, "steered")


# ============================================================================= lens
def lens(model: ModelOpt, text: TextOpt,
         target: Annotated[list[str] | None, typer.Option("--target", help="a single token whose rank and "
                                                                           "probability to follow per layer (mind "
                                                                           "the leading space: ' Mary')")] = None,
         position: Annotated[list[int] | None, typer.Option("--position", "-p", help="position to read; negative "
                                                                                     "counts from the end (default "
                                                                                     "-1); repeatable")] = None,
         top_k: Annotated[int, typer.Option("--top-k", help="top tokens listed per layer")] = 5,
         bos: BosOpt = True, db: WriteDbOpt = None, device: DeviceOpt = None, format: FormatOpt = Fmt.table) -> None:
    """Logit lens: decode every layer's residual stream (resid_pre of each layer, then the last resid_post) with the
    final LayerNorm and unembedding; per layer the top tokens and the targets' ranks. Association only."""
    fields = {"texts": text, "targets": target or [], "positions": position, "top_k": top_k, "prepend_bos": bos}
    out: Any = _run("logit_lens", fields, model=model, sae=None, device=device, db=db, format=format)
    if out is None:  # --format json: printed
        return
    from rich.table import Table

    con = console()
    con.print("logit lens: final LayerNorm + unembedding applied to each residual stream (association only; early "
              "layers are often not in the vocabulary basis)", markup=False, highlight=False)
    for r in out.readings:
        cols = ["layer", f"top {top_k} (probability)"] + [f"{t!r} rank (p)" for t in out.targets]
        t = Table(*cols, title=f"text {r.text_index} {r.text!r}, position {r.position} ({r.token!r})")
        for layer in r.layers:
            t.add_row(str(layer.site), "  ".join(f"{p.token!r} {p.prob:.3f}" for p in layer.top),
                      *(f"{x.rank} ({x.prob:.3f})" for x in layer.targets))
        t.add_row("model output", "  ".join(f"{p.token!r} {p.prob:.3f}" for p in r.prediction),
                  *(f"{x.rank} ({x.prob:.3f})" for x in r.prediction_targets))
        con.print(t)


# ============================================================================= dla
def dla(model: ModelOpt, text: TextOpt,
        target: Annotated[str, typer.Option("--target", help="the single token whose logit to attribute (' Mary')")],
        baseline: Annotated[str | None, typer.Option("--baseline", help="attribute logit(target) - "
                                                                        "logit(baseline) instead")] = None,
        position: Annotated[int, typer.Option("--position", "-p", help="position whose prediction to attribute; "
                                                                       "negative counts from the end")] = -1,
        top_n: Annotated[int, typer.Option("--top-n", help="entries listed, by |contribution|")] = 20,
        bos: BosOpt = True, db: WriteDbOpt = None, device: DeviceOpt = None, format: FormatOpt = Fmt.table) -> None:
    """Direct logit attribution: split the target's logit (or target - baseline) at one position into each
    component's direct contribution (embed, every head aL.H, attention biases, MLPs mL, final LN and unembedding
    biases; the entries sum to the real value), averaged over the texts. Direct effects only: association."""
    fields = {"texts": text, "target": target, "baseline": baseline, "position": position, "top_n": top_n,
              "prepend_bos": bos}
    out: Any = _run("direct_logit_attribution", fields, model=model, sae=None, device=device, db=db, format=format)
    if out is None:  # --format json: printed
        return
    from rich.table import Table

    con = console()
    what = f"logit({out.target!r})" + (f" - logit({out.baseline!r})" if out.baseline is not None else "")
    con.print(f"direct logit attribution of {what}, mean over {len(out.items)} text(s): total {out.total:+.4f} "
              f"(entries sum to it; check error {out.residual_error:.1e})", markup=False, highlight=False)
    ranked = sorted(out.contributions.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
    t = Table("node", "direct contribution", "share of sum of |entries|")
    denom = sum(abs(v) for v in out.contributions.values()) or 1.0
    for name, v in ranked[:top_n]:
        t.add_row(name, f"{v:+.4f}", f"{abs(v) / denom:.1%}")
    con.print(t)
    if len(ranked) > top_n:
        con.print(f"(the other {len(ranked) - top_n} entries sum to {sum(v for _, v in ranked[top_n:]):+.4f}; "
                  "--top-n lists more)", markup=False, highlight=False)
    for it in out.items:
        con.print(f"  text {it.text!r} at position {it.position} ({it.token!r}): {it.total:+.4f}", markup=False,
                  highlight=False)
    if out.note:
        con.print(out.note, markup=False, highlight=False)
    con.print("Direct effects only (not via later layers), final LN scale frozen: association-level evidence; "
              "confirm with ablation or patching.", markup=False, highlight=False)

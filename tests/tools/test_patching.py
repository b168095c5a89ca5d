"""The patching core: the graph, edge patching against a slow explicit-sum reference, EAP against explicit
gradients, node patching against TransformerLens' own patching utilities, treeified path patching on a planted
model, metrics and ablations."""

from __future__ import annotations

import random

import pytest
import torch

from autoexplain.evals.truth.planted_circuits import induction
from autoexplain.tools.errors import InputError
from autoexplain.tools.models import hook_name
from autoexplain.tools.patching import (
    Direction,
    PatchMetric,
    PatchSetup,
    build_graph,
    graph_edges,
    metric_values,
    patch_nodes,
)
from autoexplain.tools.registry import SUMMARY_MAX_CHARS, ToolContext, default_registry
from autoexplain.tools.vocab import Edge, Site, SiteKind

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def neox(tiny_neox_dir):
    from autoexplain.tools.models import load_model

    return load_model(str(tiny_neox_dir), device="cpu")


def _attn_only():
    """A random attention-only model (2 layers x 4 heads, LayerNorm), wrapped like a loaded model."""
    import warnings

    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    from autoexplain.tools.models import LoadedModel

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, attn_only=True, d_vocab=50, n_ctx=16,
                                  normalization_type="LN", seed=1, device="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedSAETransformer(cfg).eval()
    return LoadedModel(spec="attn-only", model_id="attn-only", model=model, tokenizer=None,
                       device=torch.device("cpu"))


def _random_task(lm, n: int = 5, seq: int = 7, seed: int = 0, lengths: list[int] | None = None):
    """Random clean/corrupt token pairs (BOS first), two answers and two wrong answers (one -1 padded)."""
    from autoexplain.tools.data import TokenizedTask

    g = torch.Generator().manual_seed(seed)
    vocab = int(lm.model.cfg.d_vocab)
    clean = torch.randint(1, vocab, (n, seq), generator=g)
    corrupt = torch.randint(1, vocab, (n, seq), generator=g)
    clean[:, 0] = corrupt[:, 0] = 0
    lens = torch.tensor(lengths if lengths is not None else [seq] * n)
    answers = torch.randint(1, vocab, (n, 2), generator=g)
    wrong = torch.randint(1, vocab, (n, 2), generator=g)
    wrong[0, 1] = -1
    answers[1, 1] = -1
    return TokenizedTask(clean=clean, corrupt=corrupt, answer_pos=lens - 1, answers=answers, wrong=wrong,
                         seq_lens=lens, prompts=None)


# ============================================================================= the graph
def test_edge_counts_and_names(tiny_model, neox) -> None:
    # 2 layers x 4 heads with MLPs, sequential blocks. Sources: embed, 8 heads, m0, m1.
    #   layer-0 q/k/v inputs (12) read embed only:                  12 x 1  = 12
    #   m0 reads embed and the 4 layer-0 heads:                              5
    #   layer-1 q/k/v inputs (12) read embed, a0.*, m0:             12 x 6  = 72
    #   m1 reads embed, a0.*, m0 and the 4 layer-1 heads:                   10
    #   logits read all 11 sources:                                         11
    assert len(graph_edges(tiny_model)) == 12 + 5 + 72 + 10 + 11 == 110
    # attention-only: layer-0 q/k/v read embed (12 x 1), layer-1 q/k/v read embed and a0.* (12 x 5), logits 9
    assert len(graph_edges(_attn_only())) == 12 + 60 + 9
    # GPT-NeoX runs attention and MLP in parallel: mL does not read the heads of layer L.
    assert len(graph_edges(neox)) == 12 + 1 + 72 + 6 + 11 == 102
    names = {str(e) for e in graph_edges(neox)}
    assert "a0.1->m0" not in names and "a0.1->m1" in names and "m0->a1.2.v" in names
    edges = graph_edges(tiny_model)
    assert all(Edge.parse(str(e)) == e for e in edges)
    names = {str(e) for e in edges}
    assert {"embed->a0.0.q", "a0.3->a1.2.k", "a1.2->logits", "m0->m1", "a1.0->m1", "a0.1->m0"} <= names
    g = build_graph(tiny_model)
    with pytest.raises(InputError, match="not in this model's graph"):
        g.edge_ids(["a1.0->a0.1.q"])  # backwards
    with pytest.raises(InputError, match="not in this model's graph"):
        g.edge_ids(["a0.7->logits"])  # no head 7
    with pytest.raises(InputError, match="malformed edge"):
        g.edge_ids(["a0.1->a1.2"])  # a head destination needs q/k/v


def test_unsupported_models_are_refused(tiny_model) -> None:
    from types import SimpleNamespace

    cfg = tiny_model.model.cfg
    fake = SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(**{**cfg.to_dict(), "n_key_value_heads": 2})))
    with pytest.raises(InputError, match="grouped-query attention"):
        build_graph(fake)
    fake.model.cfg.n_key_value_heads, fake.model.cfg.use_normalization_before_and_after = None, True
    with pytest.raises(InputError, match="add up to the residual stream"):
        build_graph(fake)


# ============================================================================= slow references
def _sources(lm, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every source node's output [b, p, d] from a plain cached forward pass."""
    L_ = lm.n_layers
    sites = [Site(kind=SiteKind.HEAD_OUT, layer=L, head=0) for L in range(L_)]
    names = {hook_name(Site(kind=SiteKind.RESID_PRE, layer=0))} | {hook_name(s) for s in sites}
    if not lm.attn_only:
        names |= {hook_name(Site(kind=SiteKind.MLP_OUT, layer=L)) for L in range(L_)}
    with torch.no_grad(), lm.sites_enabled(sites):
        _, cache = lm.model.run_with_cache(tokens, names_filter=lambda n: n in names)
    out = {"embed": cache[hook_name(Site(kind=SiteKind.RESID_PRE, layer=0))]}
    for L in range(L_):
        res = cache[hook_name(sites[L])]
        out.update({f"a{L}.{h}": res[:, :, h] for h in range(lm.n_heads)})
        if not lm.attn_only:
            out[f"m{L}"] = cache[hook_name(Site(kind=SiteKind.MLP_OUT, layer=L))]
    return out


def _reference_final(lm, clean: torch.Tensor, corrupt: torch.Tensor, patched: set[str]) -> torch.Tensor:
    """Final residual with the edges in ``patched`` patched, computed independently of the patching core: every
    destination input is *replaced* by an explicit sum of source outputs (the patched value on patched edges, the
    running value otherwise) plus the attention output biases, and the forward pass is repeated until the sources
    settle: 2 n_layers + 1 passes (the chain a0 -> m0 -> a1 -> m1 -> logits gets one node right per pass)."""
    model, g = lm.model, build_graph(lm)
    corr = _sources(lm, corrupt)
    cur = _sources(lm, clean)
    feeders: dict[str, list[str]] = {}
    for e in graph_edges(lm):
        feeders.setdefault(str(e).split("->")[1], []).append(str(e.src))
    b_o = [model.blocks[L].attn.b_O.detach() for L in range(lm.n_layers)]

    def total(dst: str, n_bias: int) -> torch.Tensor:
        x = sum(corr[s] if f"{s}->{dst}" in patched else cur[s] for s in feeders[dst])
        return x + sum(b_o[:n_bias], torch.zeros_like(b_o[0]))

    def qkv_hook(L: int, qkv: str):
        def fn(act, hook):
            return torch.stack([total(f"a{L}.{h}.{qkv}", L) for h in range(lm.n_heads)], dim=2)
        return fn

    def mlp_hook(L: int):
        return lambda act, hook: total(f"m{L}", L if g.parallel else L + 1)

    hooks = []
    for L in range(lm.n_layers):
        for kind, qkv in ((SiteKind.Q_IN, "q"), (SiteKind.K_IN, "k"), (SiteKind.V_IN, "v")):
            hooks.append((hook_name(Site(kind=kind, layer=L, head=0)), qkv_hook(L, qkv)))
        if not lm.attn_only:
            hooks.append((hook_name(Site(kind=SiteKind.MLP_IN, layer=L)), mlp_hook(L)))
    final_site = hook_name(Site(kind=SiteKind.RESID_POST, layer=lm.n_layers - 1))
    hooks.append((final_site, lambda act, hook: total("logits", lm.n_layers)))
    src_sites = [Site(kind=SiteKind.HEAD_OUT, layer=L, head=0) for L in range(lm.n_layers)]
    keep: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        keep[hook.name] = act

    grabs = [(hook_name(s), grab) for s in src_sites]
    if not lm.attn_only:
        grabs += [(hook_name(Site(kind=SiteKind.MLP_OUT, layer=L)), grab) for L in range(lm.n_layers)]
    with torch.no_grad(), lm.sites_enabled([dg.site for dg in g.dst_groups] + src_sites):
        for _ in range(2 * lm.n_layers + 1):
            final = model.run_with_hooks(clean, fwd_hooks=grabs + hooks, stop_at_layer=lm.n_layers)
            for L in range(lm.n_layers):
                res = keep[hook_name(src_sites[L])]
                cur.update({f"a{L}.{h}": res[:, :, h] for h in range(lm.n_heads)})
                if not lm.attn_only:
                    cur[f"m{L}"] = keep[hook_name(Site(kind=SiteKind.MLP_OUT, layer=L))]
    return final


def _logits_at(setup: PatchSetup, final: torch.Tensor) -> torch.Tensor:
    c = setup.chunks[0]
    return setup._unembed(final[torch.arange(c.size), c.pos])


# ============================================================================= edge patching
@pytest.mark.parametrize("arch", ["gpt2", "neox", "attn-only"])
def test_empty_and_full_edge_sets_give_clean_and_corrupt_runs(arch, tiny_model, neox) -> None:
    lm = {"gpt2": tiny_model, "neox": neox, "attn-only": _attn_only()}[arch]
    task = _random_task(lm)
    setup = PatchSetup(lm, task)
    g = setup.graph
    with torch.no_grad():
        clean = lm.model(task.clean)[torch.arange(5), task.answer_pos]
        corrupt = lm.model(task.corrupt)[torch.arange(5), task.answer_pos]
    expected_clean = metric_values(clean, PatchMetric.LOGIT_DIFF, task.answers, task.wrong).mean().item()
    expected_corrupt = metric_values(corrupt, PatchMetric.LOGIT_DIFF, task.answers, task.wrong).mean().item()
    assert setup.evaluate(g.mask([])) == pytest.approx(expected_clean, abs=1e-5)
    assert setup.m_clean == pytest.approx(expected_clean, abs=1e-5)
    # every edge patched through the single forward pass: the corrupt run
    full = setup.patched_logits(setup.chunks[0], g.mask())
    assert (full - corrupt).abs().max().item() <= 1e-4
    assert setup.m_ablated == pytest.approx(expected_corrupt, abs=1e-4)
    # a float mask of zeros still runs the hooks: the clean run
    tiny = g.mask([0], value=0.0)
    tiny[0, 0] = 1e-30
    assert (setup.patched_logits(setup.chunks[0], tiny) - clean).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "neox", "attn-only"])
def test_single_forward_edge_patching_equals_slow_reference(arch, tiny_model, neox) -> None:
    lm = {"gpt2": tiny_model, "neox": neox, "attn-only": _attn_only()}[arch]
    task = _random_task(lm, seed=3)
    setup = PatchSetup(lm, task)
    g = setup.graph
    rng = random.Random(0)
    for trial in range(4):
        p = (0.05, 0.3, 0.7, 0.15)[trial]
        ids = [i for i in range(g.n_edges) if rng.random() < p]
        got = setup.patched_logits(setup.chunks[0], g.mask(ids))
        ref = _logits_at(setup, _reference_final(lm, task.clean, task.corrupt, {g.names[i] for i in ids}))
        assert (got - ref).abs().max().item() <= 1e-5, (arch, trial, len(ids))


def test_start_layer_shortcut_matches_full_pass(tiny_model) -> None:
    task = _random_task(tiny_model, seed=5)
    setup = PatchSetup(tiny_model, task, metric="kl")
    g = setup.graph
    late = [i for i in range(g.n_edges) if g.dests[g.edge_dst[i]].startswith(("a1.", "m1", "logits"))][::3]
    logits_only = [i for i in range(g.n_edges) if g.dests[g.edge_dst[i]] == "logits"][::2]
    assert setup.evaluate(g.mask(late), start_layer=1) == pytest.approx(setup.evaluate(g.mask(late)), abs=1e-6)
    assert setup.evaluate(g.mask(logits_only), start_layer=2) == pytest.approx(setup.evaluate(g.mask(logits_only)),
                                                                                abs=1e-6)
    with pytest.raises(ValueError, match="skips patched destinations"):
        setup.evaluate(g.mask(late), start_layer=2)


def test_eap_equals_explicit_gradients_and_finite_differences(tiny_model) -> None:
    lm = tiny_model
    task = _random_task(lm, seed=7)
    setup = PatchSetup(lm, task)
    g = setup.graph
    scores = setup.edge_attribution([1.0])
    # reference: gradients of the metric w.r.t. every destination input from a plain hooked run
    clean_src, corr_src = _sources(lm, task.clean), _sources(lm, task.corrupt)
    inputs: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        act.retain_grad()
        inputs[hook.name] = act

    sites = [dg.site for dg in g.dst_groups] + [sg.site for sg in g.src_groups]
    with lm.sites_enabled(sites):
        final = lm.model.run_with_hooks(task.clean, fwd_hooks=[(hook_name(dg.site), keep) for dg in g.dst_groups],
                                        stop_at_layer=lm.n_layers)
        logits = setup._unembed(final[torch.arange(5), task.answer_pos])
        metric_values(logits, PatchMetric.LOGIT_DIFF, task.answers, task.wrong).mean().backward()
    lm.model.zero_grad(set_to_none=True)
    ref = torch.zeros(g.n_edges)
    for i, e in enumerate(graph_edges(lm)):
        d = g.dests[g.edge_dst[i]]
        if d == "logits":
            grad = inputs[hook_name(Site(kind=SiteKind.RESID_POST, layer=lm.n_layers - 1))].grad
        elif e.qkv:
            kind = {"q": SiteKind.Q_IN, "k": SiteKind.K_IN, "v": SiteKind.V_IN}[e.qkv]
            grad = inputs[hook_name(Site(kind=kind, layer=e.dst.layer, head=0))].grad[:, :, e.dst.head]
        else:
            grad = inputs[hook_name(Site(kind=SiteKind.MLP_IN, layer=e.dst.layer))].grad
        ref[i] = ((corr_src[str(e.src)] - clean_src[str(e.src)]) * grad).sum()
    assert torch.allclose(scores, ref, atol=1e-5, rtol=1e-4)
    # finite differences through the float mask (relative patching, a small fraction of one edge)
    eps = 1e-2
    for i in sorted(range(g.n_edges), key=lambda i: -abs(float(scores[i])))[:4]:
        fd = (setup.evaluate(g.mask([i], value=eps)) - setup.m_clean) / eps
        assert fd == pytest.approx(float(scores[i]), rel=0.05, abs=2e-3), g.names[i]


def test_eap_ig_with_one_step_is_eap_and_interpolates_inputs(tiny_model) -> None:
    setup = PatchSetup(tiny_model, _random_task(tiny_model, seed=2))
    eap = setup.edge_attribution([1.0])
    assert torch.allclose(setup.edge_attribution([1.0, 1.0]), eap, atol=1e-6)
    ig = setup.edge_attribution([0.25, 0.5, 0.75, 1.0])
    halves = (setup.edge_attribution([0.25, 0.5]) + setup.edge_attribution([0.75, 1.0])) / 2
    assert torch.allclose(ig, halves, atol=1e-5)  # batched alphas = the mean of separate runs
    assert not torch.allclose(ig, eap, atol=1e-3)


# ============================================================================= path patching
def test_treeified_path_patching_on_the_planted_induction_model() -> None:
    P = induction(n_prompts=8)
    lm, task = P.lm, P.task
    setup = PatchSetup(lm, task)
    g = setup.graph
    chunk = setup.chunks[0]
    ids = lambda *names: g.edge_ids(names)  # noqa: E731
    corr = _sources(lm, task.corrupt)
    clean = _sources(lm, task.clean)
    ar = torch.arange(chunk.size)

    def metric_of(final_at: torch.Tensor) -> float:
        with torch.no_grad():
            return float(setup.chunk_metric(chunk, setup._unembed(final_at)).mean())

    # one-edge path s -> logits is edge patching of that edge
    one = ids("a1.1->logits")
    assert setup.evaluate_paths([one]) == pytest.approx(setup.evaluate(g.mask(one)), abs=1e-5)

    # a0.0 -> a1.1.k -> logits: only the direct route, not a1.1 -> m1 -> logits
    path = ids("a0.0->a1.1.k", "a1.1->logits")
    final_ref = _reference_final(lm, task.clean, task.corrupt, {"a0.0->a1.1.k"})
    # reference: a1.1's output with only its key input patched, added to the clean logits input alone
    keep: dict[str, torch.Tensor] = {}
    src_site = Site(kind=SiteKind.HEAD_OUT, layer=1, head=0)

    def a11_with_patched_key(act, hook):
        act = act.clone()
        act[:, :, 1] += corr["a0.0"] - clean["a0.0"]
        return act

    with torch.no_grad(), lm.sites_enabled([src_site, Site(kind=SiteKind.K_IN, layer=1, head=0)]):
        lm.model.run_with_hooks(task.clean, fwd_hooks=[
            (hook_name(Site(kind=SiteKind.K_IN, layer=1, head=0)), a11_with_patched_key),
            (hook_name(src_site), lambda a, hook: keep.setdefault("a1", a))])
    delta = (keep["a1"][:, :, 1] - clean["a1.1"])[ar, chunk.pos]
    expected_path = metric_of(chunk.clean_final + delta)
    assert setup.evaluate_paths([path]) == pytest.approx(expected_path, abs=1e-4)
    edge_value = setup.evaluate(g.mask(ids("a0.0->a1.1.k")))
    assert edge_value == pytest.approx(metric_of(final_ref[ar, chunk.pos]), abs=1e-4)
    # the planted MLP m1 amplifies a1.1's output: the edge effect includes that route, the path effect does not
    assert abs(edge_value - setup.evaluate_paths([path])) > 0.5

    # three-edge path: embed -> a0.0.v -> a1.1.k -> logits (a0.0 sees the corrupt tokens only through its value)
    long_path = ids("embed->a0.0.v", "a0.0->a1.1.k", "a1.1->logits")
    keep.clear()
    with torch.no_grad(), lm.sites_enabled([Site(kind=SiteKind.HEAD_OUT, layer=0, head=0),
                                            Site(kind=SiteKind.V_IN, layer=0, head=0)]):
        def v_patch(act, hook):
            act = act.clone()
            act[:, :, 0] += corr["embed"] - clean["embed"]
            return act
        lm.model.run_with_hooks(task.clean, fwd_hooks=[
            (hook_name(Site(kind=SiteKind.V_IN, layer=0, head=0)), v_patch),
            (hook_name(Site(kind=SiteKind.HEAD_OUT, layer=0, head=0)), lambda a, hook: keep.setdefault("a0", a))])
    new_a00 = keep["a0"][:, :, 0]
    keep.clear()

    def a11_key_from_new_a00(act, hook):
        act = act.clone()
        act[:, :, 1] += new_a00 - clean["a0.0"]
        return act

    with torch.no_grad(), lm.sites_enabled([src_site, Site(kind=SiteKind.K_IN, layer=1, head=0)]):
        lm.model.run_with_hooks(task.clean, fwd_hooks=[
            (hook_name(Site(kind=SiteKind.K_IN, layer=1, head=0)), a11_key_from_new_a00),
            (hook_name(src_site), lambda a, hook: keep.setdefault("a1", a))])
    delta_long = (keep["a1"][:, :, 1] - clean["a1.1"])[ar, chunk.pos]
    assert setup.evaluate_paths([long_path]) == pytest.approx(metric_of(chunk.clean_final + delta_long), abs=1e-4)
    # several paths are independent copies: their changes add at the logits input
    both = setup.evaluate_paths([path, long_path])
    assert both == pytest.approx(metric_of(chunk.clean_final + delta + delta_long), abs=1e-4)
    with pytest.raises(InputError, match="not a chain"):
        setup.evaluate_paths([ids("a0.0->a1.1.k", "m1->logits")])
    with pytest.raises(InputError, match="must end at logits"):
        setup.evaluate_paths([ids("a0.0->a1.1.k")])


# ============================================================================= node patching vs TransformerLens
def test_node_patching_matches_transformer_lens(tiny_model) -> None:
    import transformer_lens.patching as tlp

    lm = tiny_model
    task = _random_task(lm, n=4, seq=6, seed=11)
    setup = PatchSetup(lm, task)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = logits[torch.arange(4), task.answer_pos]
        return metric_values(at, PatchMetric.LOGIT_DIFF, task.answers, task.wrong).mean()

    with torch.no_grad():
        _, clean_cache = lm.model.run_with_cache(task.clean)
        _, corrupt_cache = lm.model.run_with_cache(task.corrupt)
        cases = [
            (SiteKind.RESID_PRE, tlp.get_act_patch_resid_pre, True),
            (SiteKind.ATTN_OUT, tlp.get_act_patch_attn_out, True),
            (SiteKind.MLP_OUT, tlp.get_act_patch_mlp_out, True),
            (SiteKind.HEAD_OUT, tlp.get_act_patch_attn_head_out_all_pos, False),
            (SiteKind.Q_IN, tlp.get_act_patch_attn_head_q_all_pos, False),
            (SiteKind.K_IN, tlp.get_act_patch_attn_head_k_all_pos, False),
            (SiteKind.V_IN, tlp.get_act_patch_attn_head_v_all_pos, False),
        ]
        for kind, fn, per_pos in cases:
            # denoising: clean activations into the corrupt run (what TransformerLens' utilities do)
            ref = fn(lm.model, task.corrupt, clean_cache, metric).flatten()
            ours = patch_nodes(setup, kind, direction=Direction.DENOISING, per_position=per_pos)
            got = torch.tensor([e.value for e in ours.effects])
            assert torch.allclose(got, ref, atol=1e-4), kind
            assert ours.effects[0].site == (f"{kind.value}.0" if kind in (SiteKind.RESID_PRE, SiteKind.ATTN_OUT,
                                                                          SiteKind.MLP_OUT) else f"{kind.value}.0.0")
        # noising with resample ablation: corrupt activations into the clean run
        ref = tlp.get_act_patch_attn_head_out_all_pos(lm.model, task.clean, corrupt_cache, metric).flatten()
        ours = patch_nodes(setup, SiteKind.HEAD_OUT, direction=Direction.NOISING)
        assert torch.allclose(torch.tensor([e.value for e in ours.effects]), ref, atol=1e-4)
        assert ours.base == pytest.approx(setup.m_clean, abs=1e-6)
        assert ours.other == pytest.approx(setup.m_ablated, abs=1e-6)


def test_node_patching_ablations_and_direction_rules(tiny_model) -> None:
    task = _random_task(tiny_model, seed=4)
    zero = PatchSetup(tiny_model, task, ablation="zero")
    res = patch_nodes(zero, "resid_pre", layers=[0])
    # zeroing resid_pre.0 at every position but one: check one position by hand
    site = hook_name(Site(kind=SiteKind.RESID_PRE, layer=0))

    def z(act, hook):
        act = act.clone()
        act[:, 2] = 0
        return act

    with torch.no_grad():
        logits = tiny_model.model.run_with_hooks(task.clean, fwd_hooks=[(site, z)])[torch.arange(5), task.answer_pos]
    expected = metric_values(logits, PatchMetric.LOGIT_DIFF, task.answers, task.wrong).mean().item()
    (pos2,) = [e for e in res.effects if e.position == 2]
    assert pos2.value == pytest.approx(expected, abs=1e-4)
    with pytest.raises(InputError, match="denoising .* needs resample"):
        patch_nodes(zero, "head_out", direction="denoising")
    with pytest.raises(InputError, match="cannot patch pattern"):
        patch_nodes(zero, "pattern")


# ============================================================================= metrics and ablations
def test_metrics_with_padded_answer_lists() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0]])
    answers = torch.tensor([[3, 2], [0, -1]])
    wrong = torch.tensor([[0, -1], [1, 2]])
    ld = metric_values(logits, PatchMetric.LOGIT_DIFF, answers, wrong)
    assert ld.tolist() == pytest.approx([2.5 - 0.0, 1.0 - 0.0])
    p = logits.softmax(-1)
    assert metric_values(logits, PatchMetric.ANSWER_PROB, answers, wrong).tolist() == pytest.approx(
        [float(p[0, 3] + p[0, 2]), float(p[1, 0])])
    kl = metric_values(logits, PatchMetric.KL, answers, wrong, clean_logp=logits.log_softmax(-1))
    assert kl.abs().max() <= 1e-7


def test_variable_lengths_positions_and_ablation_values(tiny_model) -> None:
    task = _random_task(tiny_model, seed=9, lengths=[7, 5, 6, 7, 3])
    setup = PatchSetup(tiny_model, task)
    # padding never matters: each prompt alone gives the same clean metric
    alone = []
    for i in range(5):
        n = int(task.seq_lens[i])
        with torch.no_grad():
            logit = tiny_model.model(task.clean[i:i + 1, :n])[0, n - 1]
        alone.append(metric_values(logit[None], PatchMetric.LOGIT_DIFF, task.answers[i:i + 1], task.wrong[i:i + 1]))
    assert setup.m_clean == pytest.approx(float(torch.cat(alone).mean()), abs=1e-5)
    # a fixed position, counted from each prompt's end
    assert torch.equal(PatchSetup(tiny_model, task, position=-2).chunks[0].pos, task.seq_lens - 2)
    with pytest.raises(InputError, match="outside prompt 4"):
        PatchSetup(tiny_model, task, position=4)
    # mean ablation: per position, over the corrupt prompts that are that long
    mean = PatchSetup(tiny_model, task, ablation="mean")
    emb = _sources(tiny_model, task.corrupt)["embed"]
    at4 = emb[[0, 1, 2, 3], 4].mean(0)  # prompt 4 has 3 tokens: not counted at position 4
    assert torch.allclose(mean.chunks[0].patched_src[0][2, 4, 0], at4, atol=1e-6)
    # zero ablation of every edge: the logits input is the attention output biases alone
    zero = PatchSetup(tiny_model, task, ablation="zero")
    g = zero.graph
    bias = sum(tiny_model.model.blocks[L].attn.b_O for L in range(2)).detach()
    expected = zero._unembed(bias.expand(5, -1))
    assert (zero.patched_logits(zero.chunks[0], g.mask()) - expected).abs().max() <= 1e-4
    no_wrong = _random_task(tiny_model)
    no_wrong = type(no_wrong)(**{**no_wrong.__dict__, "wrong": torch.full((5, 1), -1)})
    with pytest.raises(InputError, match="no wrong_answers"):
        PatchSetup(tiny_model, no_wrong)


# ============================================================================= the tools
def test_patching_tools(tiny_model) -> None:
    reg = default_registry()
    ctx = ToolContext(model=tiny_model)
    prompts = [{"clean": "John gave a drink to", "corrupt": "Mary gave a drink to", "answers": [" Mary"],
                "wrong_answers": [" John"]},
               {"clean": "the cat sat on the", "corrupt": "the dog sat on the", "answers": [" mat"],
                "wrong_answers": [" park"]}]
    out = reg.call(ctx, "activation_patching", {"prompts": prompts, "kind": "head_out"})
    assert len(out.effects) == 8 and out.patch_type.value == "node" and len(out.summary()) <= SUMMARY_MAX_CHARS
    assert "intervention" in out.summary().lower()
    res = reg.call(ctx, "activation_patching", {"prompts": prompts, "kind": "resid_pre", "layers": [1]})
    assert {e.site for e in res.effects} == {"resid_pre.1"} and len(res.effects) == 6  # BOS + 5 tokens
    assert res.effects[0].site == Site.parse("resid_pre.1") and res.model_dump()["effects"][0]["site"] == "resid_pre.1"
    edges = reg.call(ctx, "edge_patching", {"prompts": prompts, "edges": ["a0.1->a1.2.k", "a1.2->logits"]})
    assert edges.patch_type.value == "edge" and edges.n_patched == 2
    paths = reg.call(ctx, "edge_patching", {"prompts": prompts, "paths": [["a0.1->a1.2.k", "a1.2->logits"]]})
    assert paths.patch_type.value == "path" and "path patching" in paths.summary()
    all_edges = [str(e) for e in graph_edges(tiny_model)]
    everything = reg.call(ctx, "edge_patching", {"prompts": prompts, "edges": all_edges})
    assert everything.fraction == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(InputError, match="not in this model's graph"):
        reg.call(ctx, "edge_patching", {"prompts": prompts, "edges": ["a1.2->a0.1.k"]})
    with pytest.raises(InputError, match="malformed edge"):
        reg.call(ctx, "edge_patching", {"prompts": prompts, "edges": ["a1.2->nowhere"]})
    with pytest.raises(InputError, match="exactly one of edges"):
        reg.call(ctx, "edge_patching", {"prompts": prompts})
    with pytest.raises(InputError, match="exactly one of task_file or prompts"):
        reg.call(ctx, "activation_patching", {"kind": "head_out"})
    with pytest.raises(InputError, match="prompt 0"):
        reg.call(ctx, "edge_patching", {"prompts": [{**prompts[0], "corrupt": "Mary and Bob gave a drink to"}],
                                        "edges": ["a1.2->logits"]})

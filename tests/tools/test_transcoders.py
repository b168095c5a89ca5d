"""Transcoders (sae-lens ``Transcoder`` and its skip / JumpReLU variants) as feature-circuit nodes: loaded from
sae-lens' own saved folders with both their sites checked, spliced at their output with the error term kept (the
model's output unchanged), a planted transcoder feature that carries the behaviour through the MLP recovered as the
top node, edges through it, attribution, the graph export, and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from autoexplain.evals.truth.planted_feature_circuits import (
    D_MODEL_TC,
    OUT,
    W_MISSED,
    W_YES,
    PlantedTranscoder,
    build,
    build_transcoder,
)
from autoexplain.tools.attribution import SiteUnits, attribute
from autoexplain.tools.errors import InputError
from autoexplain.tools.feature_circuits import FeatureCircuitConfig, SplicedModel, find_feature_circuit
from autoexplain.tools.graph_export import ExportLink, ExportNode, ExportPrompt, build_graph, check_graph
from autoexplain.tools.saes import TRANSCODER_ARCHITECTURES, LoadedTranscoder, load_sae
from autoexplain.tools.vocab import Site, SiteKind


@pytest.fixture(scope="module")
def pt(tmp_path_factory: pytest.TempPathFactory) -> PlantedTranscoder:
    return build_transcoder(tmp_path_factory.mktemp("planted-tc"), n_prompts=6)


def _spliced_logits(lm: Any, tc: LoadedTranscoder, tokens: torch.Tensor, *, keep_error: bool) -> torch.Tensor:
    """The model's logits with ``tc`` spliced through :class:`SiteUnits` (input kept at its input hook, state built
    at the output hook), the error term kept or zeroed."""
    units = SiteUnits(lm, tc.site, tc)
    seen: dict[str, torch.Tensor] = {}

    def keep_in(act: torch.Tensor, hook: Any) -> None:
        seen["in"] = act

    def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
        f, err = units.state(act, seen["in"])
        return units.compose([f, err if keep_error else torch.zeros_like(err)])

    assert units.read_hooks == [tc.hook_name, tc.hook_name_out]
    with torch.no_grad(), lm.sites_enabled(units.sites):
        return lm.model.run_with_hooks(tokens, fwd_hooks=[(units.in_hook, keep_in), (units.hook, splice)])


# ============================================================================= loading
def test_planted_transcoder_loads_with_both_sites(pt: PlantedTranscoder) -> None:
    tc = pt.transcoder
    assert isinstance(tc, LoadedTranscoder) and tc.is_transcoder and not pt.sae.is_transcoder
    assert (str(tc.site), str(tc.site_out), tc.d_in, tc.d_out, tc.d_sae) == ("mlp_in.0", "mlp_out.0", D_MODEL_TC,
                                                                            D_MODEL_TC, 14)
    assert tc.architecture == "transcoder" and tc.sae_id.startswith("sae-")
    assert tc.describe()["site_out"] == "mlp_out.0" and tc.describe()["hook_name_out"] == "blocks.0.hook_mlp_out"
    assert pt.sae.out_site == pt.sae.site and pt.sae.d_out == pt.sae.d_in


def test_splicing_keeps_the_output_and_matches_sae_lens(pt: PlantedTranscoder) -> None:
    lm, tc = pt.lm, pt.transcoder
    tokens = pt.task.clean
    with torch.no_grad():
        clean = lm.model(tokens)
    assert torch.allclose(_spliced_logits(lm, tc, tokens, keep_error=True), clean, atol=1e-5)
    # without the error term the missed neuron's share of YES is gone: the error is real, and read at the right hooks
    bare = _spliced_logits(lm, tc, tokens, keep_error=False)
    assert (bare - clean)[:, 4, 10].mean() == pytest.approx(-W_YES * W_MISSED, abs=1e-4)
    # sae-lens' own transcoder splice (input captured at hook_name, output replaced at hook_name_out) agrees
    with torch.no_grad(), lm.sites_enabled([tc.site]):  # hook_mlp_in fires only when switched on
        theirs = lm.model.run_with_saes(tokens, saes=[tc.sae], use_error_term=False)
    assert torch.allclose(bare, theirs, atol=1e-5)
    sm = SplicedModel(lm, pt.task, [tc])
    assert sm.evaluate([[]], invert=[True]) == pytest.approx([pt.m_clean], abs=1e-5)


def test_skip_and_jumprelu_transcoders_on_tiny_gpt2(tmp_path: Path, tiny_model) -> None:
    """A real-architecture model (LayerNorm, GELU MLP): a random skip transcoder mlp_in.1 -> mlp_out.1 loads through
    sae-lens' loader, and spliced (skip term in the error node) leaves the logits unchanged."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import (
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
    )

    torch.manual_seed(0)
    meta = SAEMetadata(hook_name="blocks.1.hook_mlp_in", hook_name_out="blocks.1.hook_mlp_out")
    skip = SkipTranscoder(SkipTranscoderConfig(d_in=32, d_sae=48, d_out=32, apply_b_dec_to_input=False,
                                               metadata=meta))
    with torch.no_grad():
        skip.W_skip.normal_(0, 0.1)
        skip.b_dec.normal_(0, 0.1)
        skip.b_enc.normal_(0, 0.1)
    skip.save_model(str(tmp_path / "skip"))
    jump = JumpReLUTranscoder(JumpReLUTranscoderConfig(d_in=32, d_sae=48, d_out=32, apply_b_dec_to_input=False,
                                                       metadata=meta))
    jump.save_model(str(tmp_path / "jump"))
    for name, arch in (("skip", "skip_transcoder"), ("jump", "jumprelu_transcoder")):
        tc = load_sae(str(tmp_path / name), tiny_model)
        assert isinstance(tc, LoadedTranscoder) and tc.architecture == arch and str(tc.site_out) == "mlp_out.1"
    tc = load_sae(str(tmp_path / "skip"), tiny_model)
    assert isinstance(tc, LoadedTranscoder)
    toks = tiny_model.to_tokens(["the cat sat on the mat"])
    with torch.no_grad():
        clean = tiny_model.model(toks)
    assert torch.allclose(_spliced_logits(tiny_model, tc, toks, keep_error=True), clean, atol=1e-4)
    assert (_spliced_logits(tiny_model, tc, toks, keep_error=False) - clean).abs().max() > 1e-3


def test_transcoder_architectures_are_sae_lens_transcoders() -> None:
    from sae_lens.registry import SAE_CLASS_REGISTRY
    from sae_lens.saes.transcoder import Transcoder

    ours = {name for name, (cls, _) in SAE_CLASS_REGISTRY.items() if issubclass(cls, Transcoder)}
    assert ours == TRANSCODER_ARCHITECTURES


def _save_tc(tmp: Path, name: str, *, hook_in: str = "blocks.0.hook_mlp_in", hook_out: str | None =
             "blocks.0.hook_mlp_out", d_in: int = D_MODEL_TC, d_out: int = D_MODEL_TC, **meta: Any) -> str:
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    extra = {} if hook_out is None else {"hook_name_out": hook_out}
    tc = Transcoder(TranscoderConfig(d_in=d_in, d_sae=8, d_out=d_out, apply_b_dec_to_input=False,
                                     metadata=SAEMetadata(hook_name=hook_in, **extra, **meta)))
    tc.save_model(str(tmp / name))
    return str(tmp / name)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"hook_out": "blocks.3.hook_mlp_out"}, r"writes hook blocks\.3\.hook_mlp_out, which this model lacks"),
    ({"hook_out": "blocks.0.hook_mlp_nowhere"}, "output: hook 'blocks.0.hook_mlp_nowhere' is not a site"),
    ({"hook_out": None}, "names no output hook"),
    ({"d_out": D_MODEL_TC + 1}, rf"d_out {D_MODEL_TC + 1} but the model's activation at mlp_out\.0"),
    ({"d_in": D_MODEL_TC - 1}, rf"d_in {D_MODEL_TC - 1} but the model's activation at mlp_in\.0"),
    ({"hook_in": "blocks.0.hook_mlp_out", "hook_out": "blocks.0.hook_mlp_in"}, "must be .* after its input"),
    ({"hook_head_index_out": 1}, "hook_head_index_out"),
])
def test_bad_transcoders_are_refused_in_one_line(pt: PlantedTranscoder, tmp_path: Path, kwargs: dict[str, Any],
                                                 match: str) -> None:
    path = _save_tc(tmp_path, "bad", **kwargs)
    with pytest.raises(InputError, match=match) as info:
        load_sae(path, pt.lm)
    assert "\n" not in str(info.value)


def test_transcoder_refused_on_a_model_without_mlps(tmp_path: Path) -> None:
    attn_only = build(n_prompts=2).lm
    path = _save_tc(tmp_path, "tc", d_in=attn_only.d_model, d_out=attn_only.d_model)
    with pytest.raises(InputError, match="attention-only"):
        load_sae(path, attn_only)


# ============================================================================= feature circuits
def test_the_planted_transcoder_feature_is_the_top_node(pt: PlantedTranscoder) -> None:
    sm = SplicedModel(pt.lm, pt.task, [pt.transcoder])
    fc = find_feature_circuit(pt.lm, pt.task, [pt.transcoder], FeatureCircuitConfig(node_threshold=0.0), spliced=sm)
    assert fc.m_clean == pytest.approx(pt.m_clean, abs=1e-5) and fc.m_ablated == pytest.approx(0.0, abs=1e-6)
    ranked = sorted((n for n in fc.nodes if n.key != "embed"), key=lambda n: -abs(n.effect))
    assert ranked[0].key == pt.feature and ranked[0].effect == pytest.approx(W_YES, abs=1e-4)
    assert ranked[1].key == pt.error and ranked[1].effect == pytest.approx(W_YES * W_MISSED, abs=1e-4)
    assert all(abs(n.effect) < 1e-5 for n in ranked[2:])
    # linear path: each node's IG effect is its ablation effect (ablated at its corrupt value, input recomputed)
    ablated = sm.evaluate([[pt.feature], [pt.error]], invert=[True, True])
    assert [fc.m_clean - m for m in ablated] == pytest.approx([W_YES, W_YES * W_MISSED], abs=1e-4)
    assert fc.transcoders == {pt.transcoder.sae_id: Site(kind=SiteKind.MLP_OUT, layer=0)}
    kept = find_feature_circuit(pt.lm, pt.task, [pt.transcoder], spliced=sm)
    assert kept.kept_keys() == {"embed", pt.feature, pt.error} and kept.faithfulness == pytest.approx(1.0, abs=1e-5)


def test_edges_run_through_the_transcoder(pt: PlantedTranscoder) -> None:
    saes = [pt.sae, pt.transcoder]  # any order: spliced in forward order (the transcoder at its output site)
    full = find_feature_circuit(pt.lm, pt.task, saes, FeatureCircuitConfig(node_threshold=0.0, all_edges=True))
    assert sum(e.weight for e in full.edges if e.dst == "logits") == pytest.approx(full.effect, abs=1e-4)
    fc = find_feature_circuit(pt.lm, pt.task, saes)
    res_out = f"{pt.sae.sae_id}#{OUT}"
    assert fc.kept_keys() == {"embed", pt.feature, pt.error, res_out}
    w = {f"{e.src}->{e.dst}": e.weight for e in fc.circuit_edges()}
    assert set(w) == {f"embed->{pt.feature}", f"embed->{pt.error}", f"{pt.feature}->{res_out}",
                      f"{pt.error}->{res_out}", f"{res_out}->logits"}
    assert w[f"{pt.feature}->{res_out}"] == pytest.approx(W_YES, abs=1e-4)
    assert w[f"{pt.error}->{res_out}"] == pytest.approx(W_YES * W_MISSED, abs=1e-4)
    assert fc.faithfulness == pytest.approx(1.0, abs=1e-5)


def test_sae_inside_the_transcoder_or_at_its_output_is_refused(pt: PlantedTranscoder) -> None:
    from autoexplain.evals.truth.planted_feature_circuits import _identity_sae
    from autoexplain.tools.saes import LoadedSAE

    def planted(hook: str, kind: SiteKind, d: int) -> LoadedSAE:
        return LoadedSAE(spec=f"planted:{kind}", sae_id=f"sae-{kind}", sae=_identity_sae(hook, d),
                         site=Site(kind=kind, layer=0), hook_name=hook)

    inside = planted("blocks.0.mlp.hook_post", SiteKind.MLP_POST, 3)
    with pytest.raises(InputError, match="inside the computation transcoder"):
        SplicedModel(pt.lm, pt.task, [pt.transcoder, inside])
    same = planted("blocks.0.hook_mlp_out", SiteKind.MLP_OUT, D_MODEL_TC)
    with pytest.raises(InputError, match="same site"):
        SplicedModel(pt.lm, pt.task, [pt.transcoder, same])


def test_attribution_to_transcoder_features(pt: PlantedTranscoder) -> None:
    res = attribute(pt.lm, pt.task, pt.transcoder.site, sae=pt.transcoder, steps=4, verify_top_k=2)
    assert float(res.values[0]) == pytest.approx(W_YES, abs=1e-4)
    assert float(res.values[-1]) == pytest.approx(W_YES * W_MISSED, abs=1e-4)  # the error unit
    assert res.ablation is not None and res.ablation[0] == pytest.approx(W_YES, abs=1e-4)
    with pytest.raises(InputError, match="reads mlp_in.0, not mlp_out.0"):
        attribute(pt.lm, pt.task, pt.transcoder.site_out, sae=pt.transcoder)


def test_graph_export_marks_transcoder_nodes(pt: PlantedTranscoder) -> None:
    fc = find_feature_circuit(pt.lm, pt.task, [pt.sae, pt.transcoder])
    tcs = set(fc.transcoders)
    nodes = [ExportNode(key=n.key, kind=n.node.kind.value, layer=None if n.node.site is None else n.node.site.layer,
                        index=n.node.index, effect=n.effect, activation=n.activation, transcoder=n.node.sae_id in tcs)
             for n in fc.kept()] + [ExportNode(key="logits", kind="logits")]
    links = [ExportLink(src=e.src, dst=e.dst, weight=e.weight) for e in fc.circuit_edges()]
    prompt = ExportPrompt(text="<0> <1> <5> <6> <9>", tokens=["<0>", "<1>", "<5>", "<6>", "<9>"],
                          token_ids=[0, 1, 5, 6, 9], answer="<10>", answer_id=10)
    g = build_graph(slug="planted-tc", scan="autoexplain:planted", prompt=prompt, nodes=nodes, links=links,
                    n_layers=1, effect=fc.effect, offsets={pt.transcoder.sae_id: pt.sae.d_sae})
    assert check_graph(g) == []
    assert g["metadata"]["transcoder_list"] == [pt.transcoder.sae_id]
    assert g["metadata"]["info"]["dictionaries"] == {pt.transcoder.sae_id: "transcoder", pt.sae.sae_id: "sae"}
    types = {n["node_id"]: n["feature_type"] for n in g["nodes"]}
    assert types[f"0_{pt.sae.d_sae}_4"] == "cross layer transcoder"  # tc#0, offset past the SAE's features
    assert types["0_-1_4"] == "mlp reconstruction error"


def test_feature_edits_reach_a_transcoder_at_an_optional_hook(pt: PlantedTranscoder) -> None:
    """The probe tools' splice (ablate / steer / output_effect) switches on the optional hook a transcoder reads
    (``mlp_in``): before, the transcoder received no input there, and zeroing the planted feature moved nothing."""
    from autoexplain.tools.probe import _spliced_logits as probe_logits

    tokens = pt.task.clean[:2]

    def zero_feature_0(acts: torch.Tensor) -> torch.Tensor:
        acts = acts.clone()
        acts[..., 0] = 0.0
        return acts

    base = probe_logits(pt.lm, pt.transcoder, tokens, None)
    edited = probe_logits(pt.lm, pt.transcoder, tokens, zero_feature_0)
    assert float((edited - base).min()) == pytest.approx(-W_YES, abs=1e-3)

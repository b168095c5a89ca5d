"""SAE loading: any sae-lens architecture from a directory, checked against the model; clear errors otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from autoexplain.tools.errors import InputError
from autoexplain.tools.saes import load_sae


def _save(tmp: Path, name: str, arch: str, d_in: int, hook: str | None) -> Path:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    meta = SAEMetadata(hook_name=hook)
    sae = {"standard": lambda: StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64, metadata=meta)),
           "topk": lambda: TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=64, k=4, metadata=meta)),
           "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=64, metadata=meta))}[arch]()
    out = tmp / name
    sae.save_model(str(out))
    return out


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_load_any_architecture_and_splice(arch: str, tmp_path: Path, tiny_model) -> None:
    path = _save(tmp_path, arch, arch, 32, "blocks.1.hook_resid_pre")
    s = load_sae(str(path), tiny_model)
    assert (s.d_in, s.d_sae, s.architecture, str(s.site)) == (32, 64, arch, "resid_pre.1")
    toks = tiny_model.to_tokens(["the cat sat on the mat"])
    with torch.no_grad():
        clean = tiny_model.model(toks)
        # sae-lens' own splice: with the error term the model's output is unchanged, without it it is not
        with_err = tiny_model.model.run_with_saes(toks, saes=[s.sae], use_error_term=True)
        spliced = tiny_model.model.run_with_saes(toks, saes=[s.sae])
    assert torch.allclose(clean, with_err, atol=1e-4)
    assert (clean - spliced).abs().max() > 1e-3


def test_sae_id_is_a_content_hash(tmp_path: Path, tiny_model) -> None:
    a = _save(tmp_path, "a", "topk", 32, "blocks.0.hook_resid_post")
    b = tmp_path / "copy-elsewhere"
    shutil.copytree(a, b)
    other = _save(tmp_path, "other", "standard", 32, "blocks.0.hook_resid_post")
    assert load_sae(str(a), tiny_model).sae_id == load_sae(str(b), tiny_model).sae_id
    assert load_sae(str(a), tiny_model).sae_id != load_sae(str(other), tiny_model).sae_id


def test_width_mismatch_is_refused(tmp_path: Path, tiny_model) -> None:
    path = _save(tmp_path, "wide", "standard", 48, "blocks.0.hook_resid_post")
    with pytest.raises(InputError, match="d_in 48 .* width 32"):
        load_sae(str(path), tiny_model)


def test_hook_missing_from_model_is_refused(tmp_path: Path, tiny_model) -> None:
    with pytest.raises(InputError, match="lacks"):
        load_sae(str(_save(tmp_path, "deep", "standard", 32, "blocks.7.hook_resid_post")), tiny_model)
    with pytest.raises(InputError, match="not a site"):
        load_sae(str(_save(tmp_path, "odd", "standard", 32, "blocks.0.hook_nonsense")), tiny_model)


def test_sae_without_hook_name_is_refused(tmp_path: Path, tiny_model) -> None:
    """sae-lens would silently skip such an SAE when splicing (it only logs a warning)."""
    path = _save(tmp_path, "nohook", "standard", 32, "blocks.0.hook_resid_post")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = None
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="names no hook"):
        load_sae(str(path), tiny_model)


def test_bad_sae_specs(tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="not an sae-lens SAE directory"):
        load_sae(str(tmp_path), tiny_model)
    path = _save(tmp_path, "noweights", "standard", 32, "blocks.0.hook_resid_post")
    (path / "sae_weights.safetensors").unlink()
    with pytest.raises(InputError, match="no sae_weights"):
        load_sae(str(path), tiny_model)
    with pytest.raises(InputError, match="RELEASE/SAE_ID"):
        load_sae("no-such-release/blocks.0", tiny_model)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="hub is unavailable"):
        load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pre", tiny_model)


def _rewrite_weights(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "sae_weights.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "sae_weights.safetensors"))


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_weights_are_refused_at_load(bad: str, tmp_path: Path, tiny_model) -> None:
    """Issue 19 (5): an all-NaN SAE loaded fine and reported every feature dead."""
    path = _save(tmp_path, bad, "standard", 32, "blocks.0.hook_resid_post")
    _rewrite_weights(path, lambda t: t["W_enc"].fill_(float(bad)))
    with pytest.raises(InputError, match=r"W_enc holds 2,048 NaN or infinite values") as e:
        load_sae(str(path), tiny_model)
    assert "\n" not in str(e.value)


def test_weights_shaped_unlike_the_config_are_refused(tmp_path: Path, tiny_model) -> None:
    path = _save(tmp_path, "shape", "standard", 32, "blocks.0.hook_resid_post")
    _rewrite_weights(path, lambda t: t.update(b_enc=torch.zeros(65)))
    with pytest.raises(InputError, match=r"(b_enc|sae-lens cannot load).*(shape|size)"):
        load_sae(str(path), tiny_model)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file_is_one_line(damage: str, tmp_path: Path, tiny_model) -> None:
    """Issue 19 (5): a truncated or corrupt sae_weights.safetensors raised a traceback."""
    path = _save(tmp_path, damage, "standard", 32, "blocks.0.hook_resid_post")
    weights = path / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    with pytest.raises(InputError, match="sae-lens cannot load") as e:
        load_sae(str(path), tiny_model)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- training settings (issue 12)
def _with_meta(path: Path, top: dict | None = None, **meta) -> Path:
    """Set metadata fields (6.0 layout) and top-level fields of a saved SAE's cfg.json."""
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"].update(meta)
    cfg.update(top or {})
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def test_window_settings_are_exposed_and_checked(tmp_path: Path, tiny_model) -> None:
    from autoexplain.tools.saes import check_window

    path = _with_meta(_save(tmp_path, "ctx16", "standard", 32, "blocks.0.hook_resid_pre"), prepend_bos=True,
                      context_size=16)
    s = load_sae(str(path), tiny_model)
    assert (s.prepend_bos, s.context_size, s.seqpos_slice) == (True, 16, None)
    assert s.describe()["context_size"] == 16
    check_window(s, 16)
    check_window(s, 2)
    with pytest.raises(InputError, match=r"ctx 17 exceeds SAE .* context_size of 16 tokens.*--ctx 16"):
        check_window(s, 17)
    nobos = load_sae(str(_with_meta(_save(tmp_path, "nobos", "standard", 32, "blocks.0.hook_resid_pre"),
                                    prepend_bos=False)), tiny_model)
    with pytest.raises(InputError, match=r"without a BOS token \(prepend_bos false\)"):
        check_window(nobos, 8)
    sliced = load_sae(str(_with_meta(_save(tmp_path, "sliced", "standard", 32, "blocks.0.hook_resid_pre"),
                                     seqpos_slice=[1, None])), tiny_model)
    with pytest.raises(InputError, match=r"seqpos_slice \[1, None\]"):
        check_window(sliced, 8)
    unknown = load_sae(str(_save(tmp_path, "plain", "standard", 32, "blocks.0.hook_resid_pre")), tiny_model)
    assert (unknown.prepend_bos, unknown.context_size) == (None, None)
    check_window(unknown, 10_000)  # nothing recorded: nothing to contradict


def test_settings_that_cannot_be_honoured_are_refused_by_name(tmp_path: Path, tiny_model) -> None:
    from autoexplain.tools.loading import check_specs
    from autoexplain.tools.saes import model_settings

    def saved(name: str, top: dict | None = None, **meta) -> str:
        return str(_with_meta(_save(tmp_path, name, "standard", 32, "blocks.0.hook_resid_pre"), top, **meta))

    with pytest.raises(InputError, match=r"model_from_pretrained_kwargs first_n_layers=1, which autoexplain cannot"):
        check_specs("toy:tiny", [saved("kw", model_from_pretrained_kwargs={"first_n_layers": 1})])
    with pytest.raises(InputError, match=r"hook_head_index 1"):
        check_specs("toy:tiny", [saved("head", hook_head_index=1)])
    assert model_settings(saved("placed", model_from_pretrained_kwargs={"n_devices": 1, "dtype": "bfloat16",
                                                                       "center_unembed": False})) == {}
    # a pre-6.0 / release-override style top-level key wins over the metadata block
    assert model_settings(saved("top", {"model_from_pretrained_kwargs": {"fold_ln": True}},
                                model_from_pretrained_kwargs={})) == {"fold_ln": True}
    norm = saved("norm", {"normalize_activations": "expected_average_only_in"})
    with pytest.raises(InputError, match=r"normalize_activations 'expected_average_only_in'.*norm_scaling_factor"):
        load_sae(norm, tiny_model)
    rescaled = load_sae(saved("rescale", {"normalize_activations": "layer_norm"}), tiny_model)  # sae-lens applies it
    assert rescaled.sae.cfg.normalize_activations == "layer_norm"


def test_sae_refused_on_a_model_loaded_with_other_settings(tmp_path: Path, tiny_gpt2_dir: Path, tiny_model) -> None:
    from autoexplain.tools import loading
    from autoexplain.tools.models import load_model

    centred = str(_with_meta(_save(tmp_path, "centred", "standard", 32, "blocks.1.hook_resid_pre"),
                             model_from_pretrained_kwargs={"center_writing_weights": True}))
    plain = str(_save(tmp_path, "plain", "standard", 32, "blocks.1.hook_resid_pre"))
    with pytest.raises(InputError, match=r"trained on the model loaded with center_writing_weights=True.*without it"):
        load_sae(centred, tiny_model)
    processed = load_model(str(tiny_gpt2_dir), device="cpu", check=False, processing={"center_writing_weights": True})
    with pytest.raises(InputError, match=r"loaded with center_writing_weights=True, which SAE .* was not trained on"):
        load_sae(plain, processed)
    lm = loading.load_model(str(tiny_gpt2_dir), device="cpu", check=False, sae_specs=[centred])
    assert lm.model_id == f"{tiny_model.model_id}+center_writing_weights"
    s = load_sae(centred, lm)
    assert s.model_settings == {"center_writing_weights": True}
    with pytest.raises(InputError, match=r"disagree .*center_writing_weights"):
        loading.check_specs(str(tiny_gpt2_dir), [centred, plain])


def _loaded(sae, transcoder: bool = False):
    from autoexplain.tools.saes import LoadedSAE, LoadedTranscoder
    from autoexplain.tools.vocab import Site, SiteKind

    site = Site(kind=SiteKind.RESID_PRE, layer=0)
    if transcoder:
        return LoadedTranscoder(spec="t", sae_id="t", sae=sae, site=site, hook_name="blocks.0.hook_resid_pre",
                                site_out=Site(kind=SiteKind.MLP_OUT, layer=0), hook_name_out="blocks.0.hook_mlp_out")
    return LoadedSAE(spec="s", sae_id="s", sae=sae, site=site, hook_name="blocks.0.hook_resid_pre")


def _feature_wise(arch: str, **cfg):
    from sae_lens import GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig

    torch.manual_seed(1)
    cls, conf = {"standard": (StandardSAE, StandardSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
                 "gated": (GatedSAE, GatedSAEConfig)}[arch]
    sae = cls(conf(d_in=32, d_sae=203, **cfg))
    with torch.no_grad():  # every per-feature tensor random, so a slice taken from the wrong place shows
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 1.0))
    return sae


@pytest.mark.parametrize(("arch", "cfg"), [("standard", {}), ("jumprelu", {}), ("gated", {}),
                                           ("standard", {"normalize_activations": "constant_norm_rescale",
                                                         "apply_b_dec_to_input": True})])
def test_feature_slice_encoder_is_the_full_encode_column_for_column(arch: str, cfg: dict) -> None:
    """sae-lens' own encode on a slice of the features gives exactly (bit for bit) those columns of the full
    encode, for ragged slices and any input layout, and leaves the module's own parameters in place."""
    from autoexplain.tools.saes import FeatureSliceEncoder

    sae = _feature_wise(arch, **cfg)
    enc = FeatureSliceEncoder.of(_loaded(sae))
    assert enc is not None
    before = {n: p for n, p in sae.named_parameters()}
    x = torch.randn(3, 40, 32) * 2
    with torch.no_grad():
        full = sae.encode(x)
        assert 0.05 < (full > 0).float().mean() < 0.95  # fires sometimes, not always
        for lo, hi in ((0, 203), (0, 9), (9, 100), (100, 196), (196, 200), (150, 203)):
            assert torch.equal(enc(x, lo, hi), full[..., lo:hi]), (lo, hi)
    assert all(p is before[n] for n, p in sae.named_parameters())


def test_feature_slice_encoder_at_gpt2_width() -> None:
    """At GPT-2-small's width (d_in 768) and 512-feature blocks, as a harvest cuts them, the blocks still equal
    the full encode bit for bit: the matrix product's inner dimension is realistic, not a toy's."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    from autoexplain.tools.saes import FeatureSliceEncoder

    torch.manual_seed(2)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=768, d_sae=2048 + 37))
    with torch.no_grad():
        sae.W_enc.normal_(0, 768**-0.5)
        sae.threshold.uniform_(0, 1)
        x = torch.randn(300, 768)
        full = sae.encode(x)
        assert 0.01 < (full > 0).float().mean() < 0.5
        enc = FeatureSliceEncoder.of(_loaded(sae))
        assert enc is not None
        edges = [0, 512, 1024, 1536, 2048, 2048 + 37]
        got = torch.cat([enc(x, lo, hi) for lo, hi in zip(edges, edges[1:])], dim=1)
    assert torch.equal(got, full)


def test_feature_slice_encoder_only_where_features_are_independent() -> None:
    """Refused (None: encode whole tokens) for TopK (features compete within a token), for a transcoder, for a
    subclass (its encode may differ), and for a module holding a per-feature tensor the table does not know."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    from autoexplain.tools.saes import FeatureSliceEncoder

    assert FeatureSliceEncoder.of(_loaded(_feature_wise("standard"))) is not None
    assert FeatureSliceEncoder.of(_loaded(TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4)))) is None
    assert FeatureSliceEncoder.of(_loaded(_feature_wise("jumprelu"), transcoder=True)) is None

    class Scaled(StandardSAE):
        pass

    assert FeatureSliceEncoder.of(_loaded(Scaled(StandardSAEConfig(d_in=32, d_sae=64)))) is None
    extra = _feature_wise("standard")
    extra.register_buffer("feature_scale", torch.ones(203))
    assert FeatureSliceEncoder.of(_loaded(extra)) is None

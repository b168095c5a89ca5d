"""Model loading: parity with plain transformers, every site exists and fires, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from autoexplain.tools import loading
from autoexplain.tools.errors import InputError
from autoexplain.tools.models import hook_name, load_model, site_from_hook_name
from autoexplain.tools.vocab import HEAD_KINDS, Site, SiteKind

TEXTS = ["the cat sat on the mat and the dog ran", "When Mary and John went to the store , John gave a drink to"]


def _hf_logits(path: Path, toks: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return hf(toks).logits


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_neox_dir"])
def test_logits_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    lm = load_model(str(path), device="cpu")
    toks = lm.to_tokens(TEXTS[:1])
    with torch.no_grad():
        ours = lm.model(toks)
    diff = (ours - _hf_logits(path, toks)).abs().max().item()
    assert diff <= 1e-4, f"max |logits - transformers| = {diff}"


def test_every_site_exists_and_fires(tiny_model) -> None:
    sites = tiny_model.sites()
    kinds = {s.kind for s in sites}
    # residual pre/post, attention and MLP outputs, per-head outputs and per-head q/k/v inputs
    assert {SiteKind.RESID_PRE, SiteKind.RESID_POST, SiteKind.ATTN_OUT, SiteKind.MLP_OUT, SiteKind.HEAD_OUT,
            SiteKind.Q_IN, SiteKind.K_IN, SiteKind.V_IN} <= kinds
    n_head_sites = sum(1 for s in sites if s.kind in HEAD_KINDS)
    assert n_head_sites == 4 * tiny_model.n_layers * tiny_model.n_heads
    assert tiny_model.check_sites(sites) == sites
    # the optional hooks are switched off again afterwards (they cost memory in every later forward)
    assert not tiny_model.model.cfg.use_split_qkv_input and not tiny_model.model.cfg.use_attn_result


def test_per_head_inputs_and_outputs_can_be_patched(tiny_model) -> None:
    """Patching one head's q input and one head's output changes the logits; the sum of heads is attn_out."""
    toks = tiny_model.to_tokens(TEXTS[:1])
    q_site, out_site = Site(kind=SiteKind.Q_IN, layer=1, head=2), Site(kind=SiteKind.HEAD_OUT, layer=0, head=1)
    seen = {}

    def zero_head(site: Site):
        def fn(act: torch.Tensor, hook) -> torch.Tensor:
            seen[site] = act.shape
            act[:, :, site.head] = 0.0
            return act
        return fn

    with tiny_model.sites_enabled([q_site, out_site]), torch.no_grad():
        clean, cache = tiny_model.model.run_with_cache(toks)
        per_head = cache[hook_name(Site(kind=SiteKind.HEAD_OUT, layer=0, head=0))]
        attn_out = cache[hook_name(Site(kind=SiteKind.ATTN_OUT, layer=0))]
        assert torch.allclose(per_head.sum(-2) + tiny_model.model.blocks[0].attn.b_O, attn_out, atol=1e-5)
        for site in (q_site, out_site):
            patched = tiny_model.model.run_with_hooks(toks, fwd_hooks=[(hook_name(site), zero_head(site))])
            assert (patched - clean).abs().max() > 1e-4, f"patching {site} changed nothing"
    assert seen[q_site][2] == tiny_model.n_heads and seen[out_site][2] == tiny_model.n_heads


def test_neox_has_no_resid_mid(tiny_neox_dir: Path) -> None:
    lm = load_model(str(tiny_neox_dir), device="cpu")
    kinds = {s.kind for s in lm.sites()}
    assert SiteKind.RESID_MID not in kinds  # parallel attention + MLP: the hook would never fire
    assert SiteKind.Q_IN in kinds and SiteKind.MLP_OUT in kinds


def test_site_round_trip_and_bad_sites(tiny_model) -> None:
    for s in tiny_model.sites():
        assert Site.parse(str(s)) == s
        if s.kind not in HEAD_KINDS:
            assert site_from_hook_name(hook_name(s)) == s
    with pytest.raises(InputError, match="layers 0..1"):
        tiny_model.validate_site(Site.parse("resid_post.5"))
    with pytest.raises(InputError, match="heads 0..3"):
        tiny_model.validate_site(Site.parse("head_out.0.9"))
    with pytest.raises(InputError, match="unknown site"):
        Site.parse("residual.0")
    with pytest.raises(InputError, match="KIND.LAYER.HEAD"):
        Site.parse("q_in.1")


def test_attn_only_model_refuses_mlp_sites(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    """TransformerLens registers hook_mlp_out in attention-only models although it never fires: refuse it."""
    from transformer_lens import HookedTransformerConfig

    from autoexplain.tools.models import LoadedModel

    lm = load_model(str(tiny_gpt2_dir), device="cpu")
    from sae_lens import HookedSAETransformer

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=50, n_ctx=8,
                                  attn_only=True, act_fn=None, d_mlp=None, device="cpu")
    attn_only = LoadedModel(spec="x", model_id="x", model=HookedSAETransformer(cfg), tokenizer=lm.tokenizer,
                            device=torch.device("cpu"))
    assert SiteKind.MLP_OUT not in {s.kind for s in attn_only.sites()}
    with pytest.raises(InputError, match="attention-only"):
        attn_only.check_sites([Site.parse("mlp_out.0")])


def test_bad_model_paths(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(tmp_path))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_gpt2_dir / "config.json", no_weights / "config.json")
    with pytest.raises(InputError, match="no model weights"):
        load_model(str(no_weights))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        load_model(str(tmp_path / "file.txt"))
    with pytest.raises(InputError, match="unknown toy model"):
        loading.load_model("toy:nosuch")
    with pytest.raises(InputError, match="toy-zoo spec: load it with autoexplain.tools.loading"):
        load_model("toy:tiny")


def test_models_and_saes_do_not_know_the_zoo() -> None:
    """The zoo builds models with tools.models; toy specs are resolved in tools.loading, so nothing in models or
    saes imports the zoo (no import cycle, not even a lazy one)."""
    import ast

    import autoexplain.tools.models
    import autoexplain.tools.saes

    for mod in (autoexplain.tools.models, autoexplain.tools.saes):
        tree = ast.parse(Path(mod.__file__ or "").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and m.endswith("zoo")}, mod.__name__


def test_hub_name_neither_cached_nor_reachable_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"'gpt2' \(hub repo gpt2\) is not cached in .*empty-cache and the Hugging "
                                         r"Face hub is unavailable \(HF_HUB_OFFLINE is set\).*local directory"):
        load_model("gpt2")
    with pytest.raises(InputError, match="not cached in"):
        loading.check_specs("gpt2")
    assert time.perf_counter() - t0 < 5


def _save_encoder(out: Path, kind: str) -> Path:
    """A tiny encoder checkpoint saved with save_pretrained, then its weights file overwritten with garbage: any
    check that read the weights would fail with another error than the architecture refusal."""
    import json

    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertModel,
        GPT2Config,
        GPT2ForSequenceClassification,
        T5Config,
        T5ForConditionalGeneration,
    )

    if kind == "classifier":  # a GPT-2 body with a classification head: not a language model
        GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                                 n_positions=16)).save_pretrained(str(out))
    elif kind == "t5":
        T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                            num_heads=2)).save_pretrained(str(out))
    else:
        cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)
        (BertForMaskedLM if kind == "mlm" else BertModel)(cfg).save_pretrained(str(out))
    if kind == "no-architectures":
        data = json.loads((out / "config.json").read_text())
        del data["architectures"]
        (out / "config.json").write_text(json.dumps(data))
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    return out


@pytest.mark.parametrize("kind", ["bert", "mlm", "no-architectures", "t5", "classifier"])
def test_encoders_are_refused_before_any_weight_is_read(kind: str, tmp_path: Path) -> None:
    path = _save_encoder(tmp_path / kind, kind)
    expect = {"t5": r"an encoder-decoder",
              "classifier": r"is not a causal language model \(GPT2ForSequenceClassification;"}.get(
        kind, r"an encoder, not a causal language model")
    with pytest.raises(InputError, match=rf"{expect}.*autoexplain explains causal LMs") as e:
        loading.check_specs(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=expect):
        load_model(str(path))  # the loader refuses the same way, before reading the garbage weights
    with pytest.raises(InputError, match="encoder model"):
        loading.check_specs("bert-base-cased")  # a TransformerLens name for an encoder, not even cached


def test_check_specs_refuses_bad_dirs_without_loading(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        loading.check_specs(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no config.json"):
        loading.check_specs(str(tmp_path))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_gpt2_dir / "config.json", no_weights / "config.json")
    with pytest.raises(InputError, match="no model weights"):
        loading.check_specs(str(no_weights))
    (no_weights / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        loading.check_specs(str(no_weights))
    garbage = tmp_path / "garbage-weights"
    shutil.copytree(tiny_gpt2_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"junk")
    loading.check_specs(str(garbage))  # a causal LM with a config and a weights file: the cheap check passes


def test_processing_changes_the_model_id_and_the_activations(tiny_gpt2_dir: Path) -> None:
    from autoexplain.tools.models import processed_model_id

    plain = load_model(str(tiny_gpt2_dir), device="cpu", check=False)
    same = load_model(str(tiny_gpt2_dir), device="cpu", check=False, processing={"center_writing_weights": False})
    done = load_model(str(tiny_gpt2_dir), device="cpu", check=False, processing={"center_writing_weights": True})
    assert plain.model_id == same.model_id and "+" not in plain.model_id and plain.processing == {}
    assert done.model_id == f"{plain.model_id}+center_writing_weights" and done.processing == {
        "center_writing_weights": True}
    assert processed_model_id("m", {"fold_ln": True, "center_writing_weights": True}) == \
        "m+center_writing_weights+fold_ln"
    toks = plain.to_tokens(TEXTS[:1])
    hook = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        a = plain.model.run_with_cache(toks, names_filter=[hook])[1][hook]
        b = done.model.run_with_cache(toks, names_filter=[hook])[1][hook]
        # centring writing weights removes exactly the mean over d_model of every residual write
        assert (a - b).abs().max() > 1e-3
        torch.testing.assert_close(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(plain.model(toks).softmax(-1), done.model(toks).softmax(-1), atol=1e-4, rtol=1e-4)


def test_device_choice() -> None:
    from autoexplain.tools.device import pick_device

    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            pick_device("cuda")

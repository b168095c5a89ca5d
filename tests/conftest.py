"""Shared fixtures: tiny locally built models (random weights), built once per session in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = ("the cat sat on the mat and the dog ran to the park . Mary and John went to the store , "
         "John gave a drink to Mary . red green blue fox owl 10 11 12 13 14 15 16 17 18 19 20").split()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _train_tokenizer(out: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(out))
    tok = GPT2TokenizerFast.from_pretrained(str(out))
    tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-architecture model with random weights saved with save_pretrained (2 layers, d_model 32, 4 heads)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    out = tmp_path_factory.mktemp("tiny-gpt2")
    _train_tokenizer(out)
    tok = GPT2TokenizerFast.from_pretrained(str(out))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_ctx=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-NeoX (Pythia-family) model with random weights saved with save_pretrained."""
    import torch
    from transformers import GPT2TokenizerFast, GPTNeoXConfig, GPTNeoXForCausalLM

    out = tmp_path_factory.mktemp("tiny-neox")
    _train_tokenizer(out)
    tok = GPT2TokenizerFast.from_pretrained(str(out))
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, rotary_pct=0.25,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPTNeoXForCausalLM(cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one torch thread is faster and far steadier on a shared machine (use per module)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests never read or write the user's real cache: the toy zoo builds into a session temp dir."""
    root = tmp_path_factory.mktemp("autoexplain-cache")
    os.environ["AUTOEXPLAIN_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_zoo(_isolated_cache: Path):
    """The ``tiny`` toy world (corpus, trained GPT-2, two sae-lens SAEs, task files), built once per session."""
    from autoexplain.tools.zoo import ensure_model

    return ensure_model("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_gpt2_dir: Path):
    """The tiny GPT-2 loaded through autoexplain (CPU)."""
    from autoexplain.tools.models import load_model

    return load_model(str(tiny_gpt2_dir), device="cpu")


# ----------------------------------------------------------------------------- planted features
#: feature index -> the words (with leading space) on which it fires, by construction. Features 3, 5, 6, 7 never fire.
PLANTED_FEATURES: dict[int, tuple[str, ...]] = {
    0: (" cat", " dog", " fox", " owl"),
    1: (" red", " green", " blue"),
    2: (" Mary", " John"),
    4: (" the",),
}
PLANTED_DEAD = (3, 5, 6, 7)


class Planted:
    """A tiny GPT-2 and a StandardSAE at ``resid_pre.0`` whose features fire exactly on known tokens."""

    def __init__(self, model_dir: Path, sae_dir: Path, token_ids: dict[int, list[int]],
                 strengths: dict[int, float]) -> None:
        self.model_dir, self.sae_dir, self.token_ids, self.strengths = model_dir, sae_dir, token_ids, strengths
        self.features = PLANTED_FEATURES
        self.dead = PLANTED_DEAD


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Planted:
    """Planted by construction: dimension f of the residual stream at ``resid_pre.0`` (token + position embedding)
    is zero everywhere except on feature f's tokens, where it is 2 + 0.5 * (rank of the token in its set); SAE
    feature f reads that dimension with bias -1, so it fires exactly on those tokens with activation
    1 + 0.5 * rank."""
    import shutil

    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    out = tmp_path_factory.mktemp("planted")
    model_dir, sae_dir = out / "model", out / "sae"
    shutil.copytree(tiny_gpt2_dir, model_dir)
    tok = GPT2TokenizerFast.from_pretrained(str(model_dir))
    hf = GPT2LMHeadModel.from_pretrained(str(model_dir))
    token_ids: dict[int, list[int]] = {}
    strengths: dict[int, float] = {}
    with torch.no_grad():
        wte, wpe = hf.transformer.wte.weight, hf.transformer.wpe.weight
        dims = sorted(set(PLANTED_FEATURES) | set(PLANTED_DEAD))
        wte[:, dims] = 0.0
        wpe[:, dims] = 0.0
        for f, words in PLANTED_FEATURES.items():
            ids = []
            for rank, w in enumerate(words):
                (tid,) = tok(w, add_special_tokens=False)["input_ids"]
                wte[tid, f] = 2.0 + 0.5 * rank
                strengths[tid] = 1.0 + 0.5 * rank
                ids.append(tid)
            token_ids[f] = ids
    hf.save_pretrained(str(model_dir))
    d = hf.config.n_embd
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=8, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre")))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_dec.zero_()
        sae.b_enc.fill_(-1.0)
        for f in dims:
            if f in PLANTED_FEATURES:
                sae.W_enc[f, f] = 1.0
            sae.W_dec[f, f] = 1.0
    sae.save_model(str(sae_dir))
    return Planted(model_dir, sae_dir, token_ids, strengths)

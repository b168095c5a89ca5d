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
@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path):
    """The tiny GPT-2 with the default planted features (``evals/truth/planted_features.py``): a StandardSAE
    at ``resid_pre.0`` whose feature 0 fires exactly on ' cat',' dog',' fox',' owl' (activation 1, 1.5, 2, 2.5),
    1 on ' red',' green',' blue', 2 on ' Mary',' John', 4 on ' the'; 3, 5, 6, 7 never fire."""
    from autoexplain.evals.truth.planted_features import plant_features

    return plant_features(tiny_gpt2_dir, tmp_path_factory.mktemp("planted"))

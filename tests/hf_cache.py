"""Lay out a Hugging Face hub cache in a directory, as ``huggingface_hub`` does, for tests that must not download.

The layout (``huggingface_hub`` "cache-system" docs)::

    CACHE/models--ORG--NAME/
        blobs/<sha256 of the content>        the file contents, one blob per distinct content
        snapshots/<40-hex commit>/<path>     relative symlinks into ../blobs (sub folders keep their path)
        refs/main                            the commit hash of ``main`` (no newline)

Point ``HF_HUB_CACHE`` (or ``HF_HOME``, whose ``hub`` folder it then is) at ``CACHE``: ``huggingface_hub`` reads the
environment once at import, so set the variables for a subprocess (:func:`hub_env`), or in-process patch
``huggingface_hub.constants.HF_HUB_CACHE``, which every download and cache lookup reads on each call.

:func:`build_gpt2_world` fills a cache with what the issue's user had: a GPT-2-small-shaped checkpoint under the
repo TransformerLens resolves ``gpt2`` to (tiny: 9 layers, d_model 32, random weights, a trained BPE tokenizer) and
the files of one SAE of sae-lens' ``gpt2-small-res-jb`` release (``blocks.8.hook_resid_pre``; random weights of the
tiny model's width), whose directory entry asks for ``center_writing_weights``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

RELEASE = "gpt2-small-res-jb"
SAE_ID = "blocks.8.hook_resid_pre"
WORDS = ("the cat sat on the mat and the dog ran to the park . Mary and John went to the store , "
         "John gave a drink to Mary . red green blue fox owl 10 11 12 13 14 15 16 17 18 19 20").split()


def repo_folder(cache: Path, repo_id: str, repo_type: str = "model") -> Path:
    """Where ``huggingface_hub`` keeps ``repo_id`` in ``cache`` (``models--ORG--NAME``)."""
    return cache / f"{repo_type}s--{repo_id.replace('/', '--')}"


def lay_out_repo(cache: Path, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model",
                 commit: str | None = None) -> Path:
    """Write ``files`` (path in the repo -> content) as one cached commit of ``repo_id`` on ``main``; return the
    snapshot directory. Blobs are named by the sha256 of their content and linked from the snapshot."""
    folder = repo_folder(cache, repo_id, repo_type)
    if commit is None:
        h = hashlib.sha1()
        for name in sorted(files):
            h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        commit = h.hexdigest()
    assert len(commit) == 40, commit
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def hub_env(root: Path, *, offline: bool = True) -> dict[str, str]:
    """Environment variables that make a subprocess use the cache under ``root`` (``root/hub``)."""
    env = {"HF_HOME": str(root), "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1" if offline else "0"
    return env


def _read_tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def tiny_gpt2_files(*, n_layer: int = 9, d_model: int = 32, n_head: int = 4, n_ctx: int = 128,
                    seed: int = 0) -> dict[str, bytes]:
    """The files of a GPT-2 checkpoint with random weights (``save_pretrained``) and a BPE tokenizer trained on a
    few words. ``config.json`` also carries ``n_ctx``, as the real ``gpt2`` repo's does."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    with tempfile.TemporaryDirectory(prefix="hf-cache-gpt2-") as tmp:
        out = Path(tmp)
        bpe = ByteLevelBPETokenizer()
        texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
        bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                                show_progress=False)
        bpe.save_model(str(out))
        tok = GPT2TokenizerFast.from_pretrained(str(out))
        tok.save_pretrained(str(out))
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=n_ctx, n_embd=d_model, n_layer=n_layer, n_head=n_head,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
        with torch.no_grad():  # random LN gains/biases and biases: processing then visibly changes activations
            for name, p in model.named_parameters():
                if "ln" in name or name.endswith("bias"):
                    p.add_(0.3 * torch.randn_like(p))
        model.save_pretrained(str(out))
        hf_cfg = json.loads((out / "config.json").read_text())
        hf_cfg["n_ctx"] = n_ctx
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        return _read_tree(out)


def release_sae_files(d_in: int, *, d_sae: int = 64, release: str = RELEASE, sae_id: str = SAE_ID,
                      context_size: int = 128, seed: int = 1) -> tuple[str, dict[str, bytes]]:
    """``(repo_id, files)`` of one SAE of a sae-lens release in sae-lens' own format, at the repo and folder that
    sae-lens' installed ``pretrained_saes.yaml`` names: ``FOLDER/cfg.json`` in the pre-6.0 layout the jb releases
    use (``hook_point``, top-level ``context_size`` …), ``FOLDER/sae_weights.safetensors`` with random weights,
    ``FOLDER/sparsity.safetensors``."""
    import torch
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory, get_repo_id_and_folder_name
    from safetensors.torch import save

    entry = get_pretrained_saes_directory()[release]
    repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    layer = int(sae_id.split(".")[1])
    cfg = {"model_name": entry.model, "hook_point": sae_id, "hook_point_layer": layer, "hook_point_head_index": None,
           "dataset_path": "Skylion007/openwebtext", "is_dataset_tokenized": False, "context_size": context_size,
           "use_cached_activations": False, "d_in": d_in, "d_sae": d_sae, "expansion_factor": d_sae // d_in,
           "b_dec_init_method": "geometric_median", "lr": 4e-4, "l1_coefficient": 8e-5, "lp_norm": 1,
           "dtype": "torch.float32", "device": "cuda", "seed": 42}
    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
               "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae ** 0.5,
               "b_enc": 0.1 * torch.randn(d_sae, generator=g), "b_dec": 0.1 * torch.randn(d_in, generator=g)}
    buf = io.BytesIO(json.dumps(cfg, indent=2).encode())
    prefix = f"{folder}/" if folder else ""
    return repo_id, {prefix + "cfg.json": buf.getvalue(), prefix + "sae_weights.safetensors": save(weights),
                     prefix + "sparsity.safetensors": save({"sparsity": -3 * torch.rand(d_sae, generator=g)})}


@dataclass
class GPT2World:
    root: Path  # HF_HOME
    cache: Path  # HF_HUB_CACHE = root / "hub"
    model_repo: str
    model_snapshot: Path
    sae_repo: str
    sae_snapshot: Path
    d_model: int


def build_gpt2_world(root: Path, *, n_layer: int = 9, d_model: int = 32) -> GPT2World:
    """A hub cache under ``root/hub`` holding TransformerLens' repo for ``gpt2`` and the ``gpt2-small-res-jb``
    SAE ``blocks.8.hook_resid_pre`` (see module doc)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    cache = root / "hub"
    model_repo = get_official_model_name("gpt2")
    model_snapshot = lay_out_repo(cache, model_repo, tiny_gpt2_files(n_layer=n_layer, d_model=d_model))
    sae_repo, files = release_sae_files(d_model)
    sae_snapshot = lay_out_repo(cache, sae_repo, files)
    return GPT2World(root=root, cache=cache, model_repo=model_repo, model_snapshot=model_snapshot,
                     sae_repo=sae_repo, sae_snapshot=sae_snapshot, d_model=d_model)

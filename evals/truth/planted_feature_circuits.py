"""A hand-planted model with SAEs whose feature circuit is known exactly.

The model is a 2-layer, 2-head attention-only transformer with no LayerNorm and unscaled attention scores; its
residual stream is split into one-hot subspaces: TOK (which token), POS (which position), OUT (evidence for the
answer) and JUNK. Two sae-lens ``StandardSAE``\\ s (ReLU, identity-like encoders) are spliced at
``resid_post.0`` and ``resid_post.1``:

* ``res0`` (layer 0; the layer's own weights are zero, so ``resid_post.0`` is the embedding): one feature per token
  (feature ``t`` reads TOK dimension ``t``); the position embedding is left to the error term.
* ``res1`` (layer 1): the same token features, plus feature ``V`` (OUT) and feature ``V + 1`` (JUNK).

Prompts are ``[BOS, X, f1, f2, END]``; clean X = A (token 1), corrupt X = B (token 2), fillers f1, f2 random (and
different between clean and corrupt, so their features change but matter not at all). The answer YES over NO.

Mechanism: head ``a1.0`` attends from every position to position 1 (its query is a constant bias, its key reads
POS; the pattern never depends on the tokens), reads TOK[A] and writes OUT; the unembedding reads OUT into the YES
logit. So the planted feature circuit is ``embed -> res0#A -> res1#OUT -> logits``, and the head that carries the
middle edge is ``a1.0``. The path is **linear** end to end (ReLUs stay in their linear region, the pattern is
fixed), so attribution and ablation effects agree exactly. Distractors: head ``a1.1`` attends to the same place,
reads TOK[B] and writes JUNK (``res1#JUNK`` fires on corrupt prompts; nothing reads it); the token features of B
and of the fillers change between clean and corrupt; ``res1``'s token features copy the residual but nothing after
layer 1 reads TOK.

:func:`build_transcoder` plants a second, 1-layer model with an MLP whose behaviour runs through a sae-lens
transcoder (``mlp_in.0 -> mlp_out.0``, saved and loaded back with the real loaders); see its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autoexplain.evals.truth.planted_circuits import zeroed_model

if TYPE_CHECKING:
    from autoexplain.tools.data import TokenizedTask
    from autoexplain.tools.models import LoadedModel
    from autoexplain.tools.saes import LoadedSAE

V = 12  # 0 BOS, 1 A, 2 B, 3..8 fillers, 9 END, 10 YES, 11 NO
A, B, END, YES, NO = 1, 2, 9, 10, 11
FILLERS = tuple(range(3, 9))
N_CTX = 8
D_HEAD = 4
TOK = slice(0, V)
POS = slice(V, V + N_CTX)
OUT = V + N_CTX
JUNK = OUT + 1
D_MODEL = JUNK + 1
#: the logit of YES per unit of OUT
W_YES = 3.0
#: attention score to position 1 (the pattern puts e^-20 elsewhere)
SCORE = 20.0


@dataclass
class PlantedFeatureCircuit:
    lm: LoadedModel
    saes: list[LoadedSAE]
    task: TokenizedTask
    #: node keys of the planted circuit (see :mod:`autoexplain.tools.feature_circuits`), summed over positions
    nodes: frozenset[str]
    #: edges ``src->dst`` between those keys
    edges: frozenset[str]
    #: the head that carries ``res0#A -> res1#OUT``
    head: str = "a1.0"


def build(n_prompts: int = 16, seed: int = 0) -> PlantedFeatureCircuit:
    """The planted model, its two SAEs and a task of ``n_prompts`` clean/corrupt pairs."""
    lm = _model()
    saes = [planted_sae("planted-res0", 0, V), planted_sae("planted-res1", 1, V + 2)]
    task = _task(n_prompts, seed)
    res0, res1 = saes[0].sae_id, saes[1].sae_id
    nodes = frozenset({"embed", f"{res0}#{A}", f"{res1}#{V}", "logits"})
    edges = frozenset({f"embed->{res0}#{A}", f"{res0}#{A}->{res1}#{V}", f"{res1}#{V}->logits"})
    return PlantedFeatureCircuit(lm=lm, saes=saes, task=task, nodes=nodes, edges=edges)


def _model() -> LoadedModel:

    from transformer_lens import HookedTransformerConfig

    from autoexplain.tools.models import LoadedModel

    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_heads=2, d_head=D_HEAD, attn_only=True,
                                  d_vocab=V, n_ctx=N_CTX, normalization_type=None, use_attn_scale=False,
                                  positional_embedding_type="standard", device="cpu", seed=0, act_fn="relu")
    model = _one_hot_model(cfg)
    with torch.no_grad():
        attn = model.blocks[1].attn
        for h, (reads, writes) in enumerate(((A, OUT), (B, JUNK))):
            attn.b_Q[h, 0] = 1.0  # a constant query ...
            attn.W_K[h, POS.start + 1, 0] = SCORE  # ... that matches position 1 only
            attn.W_V[h, TOK.start + reads, 0] = 1.0
            attn.W_O[h, 0, writes] = 1.0
        model.W_U[OUT, YES] = W_YES
    model.eval()
    return LoadedModel(spec="planted:feature-circuit", model_id="planted-feature-circuit", model=model,
                       tokenizer=None, device=torch.device("cpu"))


def planted_sae(sae_id: str, layer: int, d_sae: int) -> LoadedSAE:
    """A StandardSAE on ``resid_post.layer`` whose feature ``i < V`` reads TOK dimension i, then OUT and JUNK."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from autoexplain.tools.saes import LoadedSAE
    from autoexplain.tools.vocab import Site, SiteKind

    hook = f"blocks.{layer}.hook_resid_post"
    sae = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    dims = list(range(V)) + [OUT, JUNK]
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        for i in range(d_sae):
            sae.W_enc[dims[i], i] = 1.0
            sae.W_dec[i, dims[i]] = 1.0
    sae.eval()
    return LoadedSAE(spec=f"planted:{sae_id}", sae_id=sae_id, sae=sae,
                     site=Site(kind=SiteKind.RESID_POST, layer=layer), hook_name=hook)


def _task(n_prompts: int, seed: int) -> TokenizedTask:
    from autoexplain.tools.data import TaskFile, TaskPrompt, TokenizedTask

    g = torch.Generator().manual_seed(seed)
    clean, corrupt = [], []
    for _ in range(n_prompts):
        f = [FILLERS[int(i)] for i in torch.randint(len(FILLERS), (4,), generator=g)]
        clean.append([0, A, f[0], f[1], END])
        corrupt.append([0, B, f[2], f[3], END])

    def spell(ids: list[int]) -> str:
        return " ".join(f"<{i}>" for i in ids)

    prompts = TaskFile(prompts=[TaskPrompt(clean=spell(c), corrupt=spell(k), answers=[spell([YES])],
                                           wrong_answers=[spell([NO])]) for c, k in zip(clean, corrupt, strict=True)])
    n = len(clean)
    return TokenizedTask(clean=torch.tensor(clean), corrupt=torch.tensor(corrupt),
                         answer_pos=torch.full((n,), 4, dtype=torch.long),
                         answers=torch.full((n, 1), YES, dtype=torch.long),
                         wrong=torch.full((n, 1), NO, dtype=torch.long),
                         seq_lens=torch.full((n,), 5, dtype=torch.long), prompts=prompts)


# ============================================================================= a planted transcoder
#: the transcoder model's extra residual dimensions: what head 0.0 moves from position 1 (A-ness), and head 0.1 (B)
MOV_A = JUNK + 1
MOV_B = JUNK + 2
D_MODEL_TC = JUNK + 3
#: the MLP writes OUT through two neurons that both read MOV_A: the transcoder's feature 0 models the first
#: (weight 1), the second (weight W_MISSED) is left to its error node
W_MISSED = 0.5


@dataclass
class PlantedTranscoder:
    """The transcoder model (see :func:`build_transcoder`), its transcoder and a resid_post.0 SAE, both saved with
    sae-lens' ``save_model`` and loaded back with :func:`autoexplain.tools.saes.load_sae`, and the task."""

    lm: LoadedModel
    transcoder: LoadedSAE
    sae: LoadedSAE
    task: TokenizedTask
    #: the transcoder feature that carries the behaviour through the MLP (``SAE_ID#0``)
    feature: str
    #: the transcoder's error node: the missed neuron's share
    error: str
    #: m(clean) = W_YES * (1 + W_MISSED); the feature carries W_YES of it, the error node W_YES * W_MISSED
    m_clean: float = W_YES * (1.0 + W_MISSED)


def build_transcoder(out_dir: Path, n_prompts: int = 8, seed: int = 0) -> PlantedTranscoder:
    """A 1-layer model with an MLP whose planted feature circuit runs through a transcoder.

    Head ``a0.0`` moves TOK[A] from position 1 to every later position into MOV_A (head ``a0.1``: TOK[B] into
    MOV_B); MLP neurons 0 and 1 read MOV_A and write OUT (weights 1 and :data:`W_MISSED`), neuron 2 reads MOV_B and
    writes JUNK (nothing reads it); the unembedding reads OUT into YES. The transcoder ``mlp_in.0 -> mlp_out.0``
    has feature 0 (MOV_A -> OUT: neuron 0 exactly), feature 1 (MOV_B -> JUNK) and one feature per token (reads TOK,
    writes nothing): its error node holds neuron 1's output. The SAE on ``resid_post.0`` has one feature per
    residual dimension (feature :data:`OUT` reads OUT). Linear end to end, so the planted circuit is
    ``embed -> tc#0 -> res#OUT -> logits`` plus ``embed -> tc#err -> res#OUT``, with the feature the transcoder's
    top node (effect W_YES against W_YES * W_MISSED for the error node)."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    from autoexplain.tools.saes import load_sae

    lm = _mlp_model()
    tc = Transcoder(TranscoderConfig(d_in=D_MODEL_TC, d_sae=2 + V, d_out=D_MODEL_TC, apply_b_dec_to_input=False,
                                     metadata=SAEMetadata(hook_name="blocks.0.hook_mlp_in",
                                                          hook_name_out="blocks.0.hook_mlp_out")))
    with torch.no_grad():
        for p in tc.parameters():
            p.zero_()
        tc.W_enc[MOV_A, 0] = 1.0
        tc.W_dec[0, OUT] = 1.0
        tc.W_enc[MOV_B, 1] = 1.0
        tc.W_dec[1, JUNK] = 1.0
        for t in range(V):
            tc.W_enc[TOK.start + t, 2 + t] = 1.0
    tc.save_model(str(out_dir / "transcoder"))
    sae = _identity_sae("blocks.0.hook_resid_post", D_MODEL_TC)
    sae.save_model(str(out_dir / "res0"))
    transcoder = load_sae(str(out_dir / "transcoder"), lm)
    res = load_sae(str(out_dir / "res0"), lm)
    return PlantedTranscoder(lm=lm, transcoder=transcoder, sae=res, task=_task(n_prompts, seed),
                             feature=f"{transcoder.sae_id}#0", error=f"{transcoder.sae_id}#err")


def _identity_sae(hook: str, d: int) -> Any:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def _mlp_model() -> LoadedModel:

    from transformer_lens import HookedTransformerConfig

    from autoexplain.tools.models import LoadedModel

    cfg = HookedTransformerConfig(n_layers=1, d_model=D_MODEL_TC, n_heads=2, d_head=D_HEAD, d_mlp=3,
                                  attn_only=False, d_vocab=V, n_ctx=N_CTX, normalization_type=None,
                                  use_attn_scale=False, positional_embedding_type="standard", device="cpu", seed=0,
                                  act_fn="relu")
    model = _one_hot_model(cfg)
    with torch.no_grad():
        attn = model.blocks[0].attn
        for h, (reads, writes) in enumerate(((A, MOV_A), (B, MOV_B))):
            attn.b_Q[h, 0] = 1.0
            attn.W_K[h, POS.start + 1, 0] = SCORE
            attn.W_V[h, TOK.start + reads, 0] = 1.0
            attn.W_O[h, 0, writes] = 1.0
        mlp = model.blocks[0].mlp
        for n, (reads, writes, w) in enumerate(((MOV_A, OUT, 1.0), (MOV_A, OUT, W_MISSED), (MOV_B, JUNK, 1.0))):
            mlp.W_in[reads, n] = 1.0
            mlp.W_out[n, writes] = w
        model.W_U[OUT, YES] = W_YES
    model.eval()
    return LoadedModel(spec="planted:transcoder", model_id="planted-transcoder", model=model, tokenizer=None,
                       device=torch.device("cpu"))


def _one_hot_model(cfg: Any) -> Any:
    """A HookedSAETransformer of ``cfg`` with every weight zero but one-hot token (TOK) and position (POS)
    embeddings: the base every planted model here writes its mechanism into."""
    model = zeroed_model(cfg)
    with torch.no_grad():
        for t in range(V):
            model.W_E[t, TOK.start + t] = 1.0
        for p in range(N_CTX):
            model.W_pos[p, POS.start + p] = 1.0
    return model

"""Head and component roles: what each attention head (and MLP neuron) does, with scores, and interventions that
check a claimed role.

A circuit names components; this module says *how* they work, in the vocabulary of the circuits literature
(Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Olsson et al. 2022, "In-context Learning
and Induction Heads"; Wang et al. 2022, IOI). Every score is in [0, 1]; a score that cannot be computed is
``None`` with a reason in its details, never 0.

Roles (:class:`HeadRole`) and their detectors
--------------------------------------------
Attention-based (association), measured on generated **repeated random token sequences** ``[BOS] s1..sk s1..sk``:
tokens drawn (seeded) from the model's vocabulary without special tokens, distinct within a sequence when the
vocabulary allows (so each token has exactly one earlier occurrence to find). On such text a head's attention
has a known right answer per role:

* ``previous_token``: mean attention from position p to p-1 (p >= 2, so p-1 is never BOS);
* ``duplicate_token``: mean attention from the second occurrence of a token (second half) to its first occurrence;
* ``induction``: mean attention from the second occurrence to the token *after* the first occurrence;
* ``attends_bos``: mean attention to position 0 (an attention sink / "no-op" head), over all positions p >= 1.

Caveats: random sequences are off-distribution for a trained model (heads that need grammar look idle); a head can
score high on a pattern that is a side effect (a head that attends p-1 *and* writes junk is still a
previous-token head by this score); a head that attends to BOS by default and elsewhere on real text is scored
on this text only.

Weight-based (association), from the head's full OV circuit ``W_E W_V W_O W_U`` (the logit effect on token j of
attending to token i, direct path only):

* ``copying``: the share of the eigenvalue mass with positive real part,
  ``sum_i max(Re l_i, 0) / sum_i |l_i|`` (Elhage et al. report ``sum l / sum |l|`` in [-1, 1]; that raw ratio is in
  the details and equals copying - suppression, since the eigenvalues of a real matrix sum to its real trace);
* ``suppression``: the share with negative real part, ``sum_i max(-Re l_i, 0) / sum_i |l_i|``. Chosen over the
  mean negative diagonal because it is scale-free (the diagonal depends on the norms of embeddings and unembeddings,
  which vary by orders of magnitude between models), symmetric with copying, and reads the whole circuit rather
  than only token-to-itself entries: a suppressor that writes minus the attended name (the planted ``a1.2``) has
  all eigenvalues negative (score 1), a copier 0, and a random matrix about 0.32 for both (eigenvalues of a random
  matrix fill a disc: E[max(Re l, 0)] / E|l| = 1/pi / (2/3) ~ 0.32 in the large-matrix limit).

The V x V circuit is never built: its non-zero eigenvalues are those of the d_head x d_head matrix
``W_O (W_U[:, S] W_E[S]) W_V`` (cyclic permutation), exact for any token subset S at O(d_model^2 |S|) once per
model. S is every token except the tokenizer's special tokens (and ids past the tokenizer's length, padded rows);
for a model without tokenizer, every id except the assumed BOS 0. A head whose OV circuit has (numerically) no
eigenvalue mass, e.g. one writing only into a subspace the unembedding never reads, gets ``None``: it neither
copies nor suppresses *directly* (it may well do either through later layers, which this score does not see).

LayerNorm. Processed models (``fold_ln``) already carry the LN weights in their matrices. For unprocessed models the
LN weight ``w`` of ``ln1`` is folded into W_Q/W_K/W_V and that of ``ln_final`` into W_U, and LayerNorm's centring
is applied exactly (reading weights centred over d_model). The division by the residual norm is a positive scalar
per position and is ignored: signs of eigenvalues and composition directions are right, relative magnitudes
between tokens are approximate. Biases (b_V, b_O, b_U) and position embeddings are left out of the OV circuit.

Composition (association): for a head s in layer l and a head d in a later layer, with ``OV_s = W_V^s W_O^s`` and
``QK_d = W_Q^d W_K^d^T`` (row-vector convention, d_model x d_model), Elhage et al.'s scores
``||OV_s M|| / (||OV_s|| ||M||)`` (Frobenius), with ``M = QK_d`` for Q-composition, ``QK_d^T`` for
K-composition and ``OV_d`` for V-composition. The baseline is the same score for Gaussian random factors of the
same shapes (mean over 32 draws, seeded): for low-rank factors it is far from 0, so a raw score means little
without it. Computed from d_head x d_head Gram matrices, never d_model x d_model products per pair. Rotary
position embeddings are ignored (they rotate q and k per position).

Vocabulary projection (association): the tokens a head's OV circuit promotes / suppresses for given input tokens
(or, without inputs, the tokens it copies most and suppresses most onto themselves: the diagonal), and the tokens an
MLP neuron's output weight row promotes / suppresses through the (LN-folded) unembedding: the key-value view of an
MLP, direct path only.

Verifying a role by intervention (:func:`verify_role`)
------------------------------------------------------
Each check changes the model and predicts what moves (``CausalLevel.INTERVENTION``). Every :class:`RoleCheck`
also reports the head's detector score on the same sequences (``base_score``); ``verified`` needs the detector
score to reach ``min_score`` *and* the intervention's effect to reach ``threshold``:

* ``induction``: the head's key input (site ``k_in``) is patched with its value on the same sequences with the
  first half shuffled (a derangement): the keys no longer say "the previous token was X" at the right places, so
  the induction attention must drop by at least ``threshold`` (relative, default 0.5).
* ``duplicate_token``: the same key-input patch; the duplicate-token attention must drop by ``threshold``.
* ``previous_token``: the head's output is mean-ablated (``z``, mean over sequences per position); the induction
  score of every later head that K-composes with it (score >= 2 x baseline) and shows induction (>= min_score)
  must drop by ``threshold`` (relative, the largest drop counts). Without such a head, the increase of the
  next-token loss on the repeated half (nats) is the effect (threshold 0.05 nats, a weak check; the method says
  which ran).
* ``copying`` / ``suppression``: the head's output is mean-ablated; the effect is the attention-weighted change of
  the centred logit (logit minus the mean logit) of the tokens the head attends to (BOS excluded), at every
  position: copying needs it to fall, suppression to rise, by ``threshold`` nats (default 0.2). Direct and
  indirect effects together (``details.direct_effect`` has the direct path alone, final norm scale frozen); give
  ``prompts`` (token ids) where the role lives (the IOI names), the default repeated sequences may not exercise it.
  The weight-based score reads the token-embedding path only (``W_E``); at a later layer a head's values also
  carry earlier heads' outputs and positions, so weights and intervention can disagree (toy:small's ``a1.0``
  scores suppression 0.97 on weights yet, on the induction task, its direct path raises the logits of the tokens
  it attends to); the check is the arbiter.
* ``attends_bos``: the head's key at position 0 is replaced by the mean of its keys at the other positions; the
  attention to position 0 must drop by ``threshold`` (relative). A head that attends to the first position
  whatever its content (position-driven) also drops, since the key carries the position.

A role that cannot be checked (no head of that kind, sequences too short) returns ``verified=None`` with the reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from autoexplain.tools.errors import InputError
from autoexplain.tools.models import hook_name
from autoexplain.tools.registry import Cost, ToolContext, ToolOutput, ToolSpec, round_sig
from autoexplain.tools.vocab import CausalLevel, Node, Site, SiteKind

if TYPE_CHECKING:
    from autoexplain.tools.models import LoadedModel


class HeadRole(StrEnum):
    PREVIOUS_TOKEN = "previous_token"
    DUPLICATE_TOKEN = "duplicate_token"
    INDUCTION = "induction"
    COPYING = "copying"
    SUPPRESSION = "suppression"
    ATTENDS_BOS = "attends_bos"


#: Most specific first: the best role of a head is the first role in this order whose score passes the cut.
ROLE_PRIORITY: tuple[HeadRole, ...] = (HeadRole.INDUCTION, HeadRole.DUPLICATE_TOKEN, HeadRole.PREVIOUS_TOKEN,
                                       HeadRole.SUPPRESSION, HeadRole.COPYING, HeadRole.ATTENDS_BOS)
ATTENTION_ROLES = (HeadRole.PREVIOUS_TOKEN, HeadRole.DUPLICATE_TOKEN, HeadRole.INDUCTION, HeadRole.ATTENDS_BOS)
OV_ROLES = (HeadRole.COPYING, HeadRole.SUPPRESSION)
#: Relative eigenvalue mass (vs the largest head's) below which a head's OV circuit counts as zero.
_ZERO_OV = 1e-6
_BASELINE_DRAWS = 32
QKV = Literal["q", "k", "v"]
#: Composition edges kept in the role table: score >= this x the random baseline. The random score is tightly
#: concentrated (d_model 96, d_head 48: mean 0.102, std 0.002 over 200 draws, max 0.107), so 1.5x is more than 20
#: standard deviations above it; a perfectly aligned rank-r composition scores 1/sqrt(r), only ~2x the baseline
#: for the planted rank-24 K-composition a0.0 -> a1.1.
COMPOSITION_RATIO = 1.5


# ============================================================================= shared pydantic models
class RoleScore(BaseModel):
    node: Node
    role: HeadRole
    score: float | None = Field(description="in [0, 1]; None when it cannot be computed (reason in details)")
    details: dict[str, Any] = Field(default_factory=dict)


class CompositionScore(BaseModel):
    src: Node
    dst: Node
    kind: QKV
    score: float
    baseline: float = Field(description="the same score for random matrices of the same shapes (mean of draws)")

    @property
    def ratio(self) -> float:
        return self.score / self.baseline if self.baseline > 0 else math.inf


class HeadRoles(BaseModel):
    """One row of the role table."""

    node: Node
    best_role: HeadRole | None = Field(description="the most specific role whose score passes the cut; None if none")
    best_score: float | None
    scores: dict[str, float | None] = Field(description="role -> score (None: not computable)")
    notable: list[HeadRole] = Field(default_factory=list, description="every role passing the cut")
    composes_into: list[str] = Field(default_factory=list, description="edges out, e.g. 'a1.1.k' (above baseline)")
    composed_from: list[str] = Field(default_factory=list, description="edges in, e.g. 'a0.0.k' (above baseline)")


class RoleCheck(BaseModel):
    node: str
    role: HeadRole
    claim: str
    verified: bool | None = Field(description="None when the check cannot be run (reason in details)")
    effect: float | None
    threshold: float
    method: str
    details: dict[str, Any] = Field(default_factory=dict)


# ============================================================================= helpers
def _head_node(lm: LoadedModel, node: Node | str) -> Node:
    """``node`` as a head of this model, or an InputError naming the valid heads."""
    n = Node.coerce(node) if isinstance(node, str) else node
    valid = f"a0.0 .. a{lm.n_layers - 1}.{lm.n_heads - 1}"
    if not n.is_head:
        raise InputError(f"node {n} is not an attention head: give a head aL.H ({valid})")
    assert n.layer is not None and n.head is not None
    if n.layer >= lm.n_layers or n.head >= lm.n_heads:
        raise InputError(f"head {n} does not exist in this model: the heads are {valid}")
    return n


def _all_heads(lm: LoadedModel) -> list[Node]:
    return [Node(name=f"a{layer}.{h}") for layer in range(lm.n_layers) for h in range(lm.n_heads)]


def _tok_str(lm: LoadedModel, token_id: int) -> str:
    return lm.token_str(token_id) if lm.tokenizer is not None else f"<{int(token_id)}>"


def _bos_id(lm: LoadedModel) -> tuple[int, str]:
    tok = lm.tokenizer
    if tok is not None:
        for attr in ("bos_token_id", "eos_token_id"):
            v = getattr(tok, attr, None)
            if v is not None:
                return int(v), f"tokenizer {attr}"
    return 0, "assumed 0 (the model has no tokenizer)"


def _vocab_ids(lm: LoadedModel) -> tuple[torch.Tensor, str]:
    """Token ids usable as 'ordinary' tokens: the tokenizer's ids without special tokens (and without padded rows
    past the tokenizer); without a tokenizer, every id but the assumed BOS 0."""
    d_vocab = int(lm.model.cfg.d_vocab)
    tok = lm.tokenizer
    if tok is None:
        bos, _ = _bos_id(lm)
        ids = [i for i in range(d_vocab) if i != bos]
        return torch.tensor(ids, dtype=torch.long), f"ids 0..{d_vocab - 1} except BOS {bos} (no tokenizer)"
    n = min(d_vocab, len(tok))
    special = {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
    ids = [i for i in range(n) if i not in special]
    return torch.tensor(ids, dtype=torch.long), f"{len(ids)} of {d_vocab} ids (special tokens and ids past the " \
                                                f"tokenizer excluded)"


def repeated_sequences(lm: LoadedModel, n_seqs: int, half_len: int | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """``n_seqs`` sequences ``[BOS] s1..sk s1..sk`` (k = ``half_len``, default min(20, (n_ctx - 1) // 2)), tokens
    distinct within a sequence when the vocabulary allows; returns (tokens [n, 2k+1], k, details)."""
    ids, vocab_note = _vocab_ids(lm)
    k_max = (lm.n_ctx - 1) // 2
    k = min(20, k_max) if half_len is None else half_len
    if k < 2 or k > k_max:
        raise InputError(f"half_len {k} does not fit: repeated sequences need 2 <= half_len <= {k_max} "
                         f"(context {lm.n_ctx})")
    if len(ids) < 2:
        raise InputError("the model's vocabulary has fewer than 2 ordinary tokens: no random sequences to build")
    bos, bos_note = _bos_id(lm)
    g = torch.Generator().manual_seed(seed)
    rows = []
    distinct = len(ids) >= k
    for _ in range(n_seqs):
        pick = torch.randperm(len(ids), generator=g)[:k] if distinct else torch.randint(len(ids), (k,), generator=g)
        s = ids[pick]
        rows.append(torch.cat([torch.tensor([bos]), s, s]))
    details = {"n_seqs": n_seqs, "half_len": k, "seq_len": 2 * k + 1, "seed": seed, "bos": bos_note,
               "tokens": vocab_note, "distinct_within_sequence": distinct}
    return torch.stack(rows).to(lm.device), k, details


def _patterns(lm: LoadedModel, tokens: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Attention patterns of every layer: [layer, n, head, query, key] (float32, on CPU)."""
    names = [hook_name(Site(kind=SiteKind.PATTERN, layer=layer)) for layer in range(lm.n_layers)]
    out: list[torch.Tensor] = []
    got: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        got[hook.name] = act.detach().float().cpu()

    for start in range(0, tokens.shape[0], batch):
        got.clear()
        with torch.no_grad():
            lm.model.run_with_hooks(tokens[start:start + batch], fwd_hooks=[(n, grab) for n in names],
                                    return_type=None)
        out.append(torch.stack([got[n] for n in names]))
    return torch.cat(out, dim=1)


def _attention_scores(pat: torch.Tensor, k: int) -> dict[HeadRole, torch.Tensor]:
    """Per-head role scores [layer, head] from patterns [layer, n, head, q, key] on [BOS] s s (half length k)."""
    n_pos = 2 * k + 1
    q_prev = torch.arange(2, n_pos)
    q_second = torch.arange(k + 1, n_pos)
    return {
        HeadRole.PREVIOUS_TOKEN: pat[..., q_prev, q_prev - 1].mean(dim=(1, 3)),
        HeadRole.DUPLICATE_TOKEN: pat[..., q_second, q_second - k].mean(dim=(1, 3)),
        HeadRole.INDUCTION: pat[..., q_second, q_second - k + 1].mean(dim=(1, 3)),
        HeadRole.ATTENDS_BOS: pat[..., 1:, 0].mean(dim=(1, 3)),
    }


def _positions_note(k: int) -> dict[str, int]:
    return {"previous_token_positions": 2 * k - 1, "duplicate_and_induction_positions": k,
            "attends_bos_positions": 2 * k}


# ============================================================================= effective weights
@dataclass
class _Weights:
    """Float64 weights with LayerNorm weights folded and centring applied (see the module doc)."""

    W_Q: list[torch.Tensor]  # per layer [H, d, dh]
    W_K: list[torch.Tensor]
    W_V: list[torch.Tensor]
    W_O: list[torch.Tensor]  # [H, dh, d]
    W_E: torch.Tensor  # [V, d]
    W_U: torch.Tensor  # [d, V]
    note: str


def _norm_fold(norm: Any) -> tuple[torch.Tensor | None, bool, str]:
    """(weight to fold or None, centres?, name) of a TransformerLens normalisation module (or None)."""
    from transformer_lens.components import LayerNorm, LayerNormPre

    if norm is None:
        return None, False, "none"
    w = getattr(norm, "w", None)
    centres = isinstance(norm, (LayerNorm, LayerNormPre))
    return (None if w is None else w.detach().to(torch.float64).cpu()), centres, type(norm).__name__


def _read(w_read: torch.Tensor, fold: torch.Tensor | None, centres: bool) -> torch.Tensor:
    """A reading weight [.., d, x] as seen from the residual: diag(w) applied, then (LN) centring over d."""
    out = w_read if fold is None else fold[:, None] * w_read
    return out - out.mean(dim=-2, keepdim=True) if centres else out


def effective_weights(lm: LoadedModel) -> _Weights:
    model = lm.model
    qs, ks, vs, os_ = [], [], [], []
    ln_names = set()
    for block in model.blocks:
        attn = block.attn
        w, centres, name = _norm_fold(getattr(block, "ln1", None))
        ln_names.add(name)
        f64 = lambda t: t.detach().to(torch.float64).cpu()  # noqa: E731
        qs.append(_read(f64(attn.W_Q), w, centres))
        ks.append(_read(f64(attn.W_K), w, centres))
        vs.append(_read(f64(attn.W_V), w, centres))
        os_.append(f64(attn.W_O))
    w, centres, name = _norm_fold(getattr(model, "ln_final", None))
    w_u = _read(model.W_U.detach().to(torch.float64).cpu(), w, centres)
    note = (f"norms ln1 {'/'.join(sorted(ln_names))}, ln_final {name}: weights folded, centring applied, "
            "the 1/norm scale ignored")
    return _Weights(qs, ks, vs, os_, model.W_E.detach().to(torch.float64).cpu(), w_u, note)


# ============================================================================= OV scores
def ov_eigen_scores(lm: LoadedModel, weights: _Weights | None = None) -> list[RoleScore]:
    """Copying and suppression scores of every head from the eigenvalues of its full OV circuit (module doc)."""
    wts = weights or effective_weights(lm)
    ids, vocab_note = _vocab_ids(lm)
    g = wts.W_U[:, ids] @ wts.W_E[ids]  # [d, d]: the circuit's vocabulary part, computed once
    eig: dict[Node, torch.Tensor] = {}
    for layer in range(lm.n_layers):
        m = wts.W_O[layer] @ g @ wts.W_V[layer]  # [H, dh, dh]
        for h in range(lm.n_heads):
            eig[Node(name=f"a{layer}.{h}")] = torch.linalg.eigvals(m[h])
    mass = {n: float(e.abs().sum()) for n, e in eig.items()}
    top = max(mass.values(), default=0.0)
    out: list[RoleScore] = []
    for n, e in eig.items():
        base = {"method": "eigenvalues of W_E W_V W_O W_U (via the d_head x d_head cyclic form)",
                "vocabulary": vocab_note, "layernorm": wts.note}
        if top == 0 or mass[n] <= _ZERO_OV * top:
            why = ("the head's OV circuit has no eigenvalue mass through the unembedding (it writes nothing the "
                   "unembedding reads, or only off-diagonal chains): no direct copying or suppression to score")
            for role in OV_ROLES:
                out.append(RoleScore(node=n, role=role, score=None, details={**base, "reason": why}))
            continue
        re = e.real
        pos = float(re.clamp(min=0).sum()) / mass[n]
        neg = float((-re).clamp(min=0).sum()) / mass[n]
        raw = float(re.sum()) / mass[n]
        d = {**base, "elhage_ratio": round_sig(raw), "eigen_mass": round_sig(mass[n]),
             "top_eigenvalues": [round_sig(float(x)) for x in re[re.abs().argsort(descending=True)][:3]]}
        out.append(RoleScore(node=n, role=HeadRole.COPYING, score=round_sig(pos), details=d))
        out.append(RoleScore(node=n, role=HeadRole.SUPPRESSION, score=round_sig(neg), details=d))
    return out


# ============================================================================= composition
def _fro2(a_gram: torch.Tensor, b_gram: torch.Tensor) -> torch.Tensor:
    """||A B||_F^2 = tr((A^T A)(B B^T)) from the two Gram matrices (batched over leading dims)."""
    return (a_gram * b_gram.transpose(-1, -2)).sum(dim=(-1, -2))


def _comp_score(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||(a b)(x y)|| / (||a b|| ||x y||) for a [S, d, r], b [S, r, d], x [D, d, r2], y [D, r2, d] -> [S, D]."""
    ga = a.transpose(-1, -2) @ a  # [S, r, r]
    gb = b @ b.transpose(-1, -2)  # [S, r, r]
    gx = x.transpose(-1, -2) @ x  # [D, r2, r2]
    gy = y @ y.transpose(-1, -2)  # [D, r2, r2]
    m = torch.einsum("srd,tdq->strq", b, x)  # b x: [S, D, r, r2]
    # ||a m y||^2 = tr(m^T (a^T a) m (y y^T))
    inner = torch.einsum("sij,stjk->stik", ga, m)  # [S, D, r, r2]
    left = torch.einsum("stik,tkl->stil", inner, gy)  # [S, D, r, r2]
    num = (left * m).sum(dim=(-1, -2)).clamp(min=0).sqrt()
    den = _fro2(ga, gb).clamp(min=0).sqrt()[:, None] * _fro2(gx, gy).clamp(min=0).sqrt()[None, :]
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def composition_baseline(d_model: int, d_head: int, draws: int = _BASELINE_DRAWS, seed: int = 0) -> float:
    """Mean composition score of Gaussian random factors with the model's shapes (the same for q, k and v)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    s = _comp_score(r(draws, d_model, d_head), r(draws, d_head, d_model), r(1, d_model, d_head),
                    r(1, d_head, d_model))
    return float(s.mean())


def composition_scores(lm: LoadedModel, weights: _Weights | None = None, *,
                       src: Node | None = None) -> list[CompositionScore]:
    """Q-, K- and V-composition scores for every pair of heads in different layers (module doc), with baseline;
    only the pairs leaving ``src`` when it is given."""
    wts = weights or effective_weights(lm)
    d_head = int(lm.model.cfg.d_head)
    base = round_sig(composition_baseline(lm.d_model, d_head))
    out: list[CompositionScore] = []
    for ls in range(lm.n_layers):
        if src is not None and src.layer != ls:
            continue
        for ld in range(ls + 1, lm.n_layers):
            right: dict[QKV, tuple[torch.Tensor, torch.Tensor]] = {
                     "q": (wts.W_Q[ld], wts.W_K[ld].transpose(-1, -2)),
                     "k": (wts.W_K[ld], wts.W_Q[ld].transpose(-1, -2)),
                     "v": (wts.W_V[ld], wts.W_O[ld])}
            for kind, (x, y) in right.items():
                s = _comp_score(wts.W_V[ls], wts.W_O[ls], x, y)
                for hs in range(lm.n_heads) if src is None else [src.head]:
                    assert hs is not None
                    for hd in range(lm.n_heads):
                        out.append(CompositionScore(src=Node(name=f"a{ls}.{hs}"), dst=Node(name=f"a{ld}.{hd}"),
                                                    kind=kind, score=round_sig(float(s[hs, hd])), baseline=base))
    return out


# ============================================================================= the role table
class RoleTable(ToolOutput):
    model_id: str
    heads: list[HeadRoles]
    scores: list[RoleScore]
    composition: list[CompositionScore] = Field(description="edges with score >= composition_ratio x baseline")
    cut: float
    composition_ratio: float
    sequences: dict[str, Any] = Field(description="the repeated random sequences the attention scores used")
    seconds: float
    notes: list[str] = Field(default_factory=list)

    def summary_text(self) -> str:
        lines = [f"head roles of {self.model_id} (association: attention on {self.sequences.get('n_seqs')} repeated "
                 f"random sequences of length {self.sequences.get('seq_len')}, OV eigenvalues; cut {self.cut}):"]
        with_role = [h for h in self.heads if h.best_role is not None]
        for h in sorted(with_role, key=lambda h: -(h.best_score or 0.0))[:30]:
            assert h.best_role is not None
            others = ", ".join(f"{r.value} {_fmt(h.scores.get(r.value))}" for r in h.notable if r != h.best_role)
            lines.append(f"{h.node}: {h.best_role.value} {_fmt(h.best_score)}" + (f" (also {others})" if others else "")
                         + (f"; -> {','.join(h.composes_into[:4])}" if h.composes_into else ""))
        if len(with_role) > 30:
            lines.append(f"… and {len(with_role) - 30} more heads with a role")
        idle = [str(h.node) for h in self.heads if h.best_role is None]
        if idle:
            lines.append(f"no role above the cut ({len(idle)}): {', '.join(idle[:24])}" + (" …" if len(idle) > 24
                                                                                         else ""))
        top = sorted(self.composition, key=lambda c: -c.ratio)[:8]
        if top:
            lines.append("composition above baseline: " + "; ".join(
                f"{c.src}->{c.dst}.{c.kind} {c.score:.3g} (base {c.baseline:.3g})" for c in top))
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def role_table(lm: LoadedModel, *, n_seqs: int = 32, half_len: int | None = None, seed: int = 0, cut: float = 0.5,
               composition_ratio: float = COMPOSITION_RATIO) -> RoleTable:
    """Every head x every role score, the best role per head, and composition edges above baseline."""
    if not 0 < cut <= 1:
        raise InputError(f"cut must be in (0, 1], got {cut}")
    if n_seqs < 1:
        raise InputError(f"n_seqs must be >= 1, got {n_seqs}")
    t0 = time.perf_counter()
    tokens, k, seq_details = repeated_sequences(lm, n_seqs, half_len, seed)
    att = _attention_scores(_patterns(lm, tokens), k)
    seq_details.update(_positions_note(k))
    scores: list[RoleScore] = []
    for role, per_head in att.items():
        for node in _all_heads(lm):
            assert node.layer is not None and node.head is not None
            scores.append(RoleScore(node=node, role=role, score=round_sig(float(per_head[node.layer, node.head])),
                                    details={"method": "mean attention on repeated random sequences"}))
    wts = effective_weights(lm)
    scores += ov_eigen_scores(lm, wts)
    comps = [c for c in composition_scores(lm, wts) if c.score >= composition_ratio * c.baseline]
    by_node: dict[str, dict[str, float | None]] = {}
    for rs in scores:
        by_node.setdefault(str(rs.node), {})[rs.role.value] = rs.score
    rows = []
    for node in _all_heads(lm):
        sc = by_node[str(node)]
        notable = [r for r in ROLE_PRIORITY if (sc.get(r.value) or 0.0) >= cut]
        best = notable[0] if notable else None
        rows.append(HeadRoles(node=node, best_role=best, best_score=sc.get(best.value) if best else None, scores=sc,
                              notable=notable,
                              composes_into=[f"{c.dst}.{c.kind}" for c in comps if c.src == node],
                              composed_from=[f"{c.src}.{c.kind}" for c in comps if c.dst == node]))
    notes = [f"OV scores: {wts.note}", "attention scores on random sequences are off-distribution for trained "
             "models; confirm a role with verify_head_role"]
    return RoleTable(model_id=lm.model_id, heads=rows, scores=scores, composition=comps, cut=cut,
                     composition_ratio=composition_ratio, sequences=seq_details,
                     seconds=round(time.perf_counter() - t0, 3), notes=notes)


# ============================================================================= attention patterns
class AttendedPosition(BaseModel):
    position: int
    token: str
    weight: float


class QueryAttention(BaseModel):
    head: Node
    query_position: int
    query_token: str
    top: list[AttendedPosition]


class PromptAttention(BaseModel):
    prompt: str
    tokens: list[str]
    queries: list[QueryAttention]


class AttentionPatternOut(ToolOutput):
    prompts: list[PromptAttention]

    def summary_text(self) -> str:
        lines = ["attention (association; top attended positions per head and query position):"]
        for i, p in enumerate(self.prompts):
            lines.append(f"prompt {i} {p.prompt[:60]!r}:")
            for q in p.queries[:24]:
                tops = " ".join(f"{a.position}{a.token!r}:{a.weight:.2f}" for a in q.top)
                lines.append(f"  {q.head} @{q.query_position}{q.query_token!r} -> {tops}")
        return "\n".join(lines)


def _prompt_ids(lm: LoadedModel, texts: Sequence[str] | None, token_ids: Sequence[Sequence[int]] | None,
                prepend_bos: bool) -> list[tuple[str, list[int]]]:
    """(label, ids) per prompt from texts (tokenizer) or token ids, validated against the vocabulary and context."""
    out: list[tuple[str, list[int]]] = []
    d_vocab = int(lm.model.cfg.d_vocab)
    if bool(texts) == bool(token_ids):
        raise InputError("give texts or token_ids (exactly one)")
    if texts:
        if lm.tokenizer is None:
            raise InputError("this model has no tokenizer: give token_ids instead of texts")
        for t in texts:
            ids = lm.to_tokens(t, prepend_bos=prepend_bos, truncate=False)[0].tolist()
            out.append((t, [int(i) for i in ids]))
    else:
        assert token_ids is not None
        for row in token_ids:
            ids = [int(i) for i in row]
            bad = [i for i in ids if not 0 <= i < d_vocab]
            if not ids or bad:
                raise InputError(f"token ids must be 0..{d_vocab - 1} and non-empty; got {list(row)[:8]}")
            out.append((" ".join(f"<{i}>" for i in ids), ids))
    for label, ids in out:
        if len(ids) > lm.n_ctx:
            raise InputError(f"prompt {label[:40]!r} is {len(ids)} tokens but the context is {lm.n_ctx}: shorten it")
    return out


def attention_patterns(lm: LoadedModel, prompts: list[tuple[str, list[int]]], heads: Sequence[Node] | None = None,
                       positions: Sequence[int] | None = None, top_k: int = 5) -> AttentionPatternOut:
    """Top-``top_k`` attended positions of each head at each chosen query position (default: the last)."""
    nodes = [_head_node(lm, h) for h in heads] if heads else _all_heads(lm)
    result = []
    for label, ids in prompts:
        pat = _patterns(lm, torch.tensor([ids], device=lm.device))[:, 0]  # [layer, head, q, k]
        toks = [_tok_str(lm, i) for i in ids]
        qs = []
        for p in (positions if positions is not None else [-1]):
            q = p if p >= 0 else len(ids) + p
            if not 0 <= q < len(ids):
                raise InputError(f"position {p} is outside prompt {label[:40]!r} ({len(ids)} tokens)")
            for n in nodes:
                assert n.layer is not None and n.head is not None
                row = pat[n.layer, n.head, q, : q + 1]
                w, idx = row.topk(min(top_k, q + 1))
                qs.append(QueryAttention(head=n, query_position=q, query_token=toks[q],
                                         top=[AttendedPosition(position=int(i), token=toks[int(i)],
                                                               weight=round(float(x), 4))
                                              for x, i in zip(w.tolist(), idx.tolist(), strict=True)]))
        result.append(PromptAttention(prompt=label, tokens=toks, queries=qs))
    return AttentionPatternOut(prompts=result)


# ============================================================================= vocabulary projection
class TokenWeight(BaseModel):
    token: str
    token_id: int
    value: float


class ProjectionRow(BaseModel):
    input: str = Field(description="the input token, 'diagonal', or the neuron")
    promoted: list[TokenWeight]
    suppressed: list[TokenWeight]


class VocabProjectionOut(ToolOutput):
    node: Node
    neuron: int | None
    rows: list[ProjectionRow]
    note: str

    def summary_text(self) -> str:
        what = f"{self.node}" + (f" neuron {self.neuron}" if self.neuron is not None else "")
        lines = [f"vocabulary projection of {what} (direct path only, association; {self.note}):"]
        for r in self.rows[:12]:
            up = " ".join(f"{t.token!r}{t.value:+.2g}" for t in r.promoted[:8])
            dn = " ".join(f"{t.token!r}{t.value:+.2g}" for t in r.suppressed[:8])
            lines.append(f"{r.input}: promotes {up} | suppresses {dn}")
        return "\n".join(lines)


def _top_tokens(lm: LoadedModel, values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[list[TokenWeight],
                                                                                          list[TokenWeight]]:
    k = min(k, values.numel())
    up, dn = values.topk(k), (-values).topk(k)
    mk = lambda v, i: TokenWeight(token=_tok_str(lm, int(ids[i])), token_id=int(ids[i]),  # noqa: E731
                                  value=round_sig(float(v)))
    return ([mk(v, i) for v, i in zip(up.values, up.indices, strict=True)],
            [mk(-v, i) for v, i in zip(dn.values, dn.indices, strict=True)])


def vocab_projection(lm: LoadedModel, node: Node | str, *, neuron: int | None = None,
                     input_ids: Sequence[int] | None = None, top_k: int = 10) -> VocabProjectionOut:
    """For a head: the promoted / suppressed output tokens of its OV circuit per input token (or its diagonal);
    for an MLP ``mL`` and a neuron: the tokens its output weight row promotes / suppresses through W_U."""
    n = Node.coerce(node) if isinstance(node, str) else node
    wts = effective_weights(lm)
    ids, vocab_note = _vocab_ids(lm)
    w_u = wts.W_U[:, ids]
    if n.name.startswith("m"):
        assert n.layer is not None
        if lm.attn_only or n.layer >= lm.n_layers:
            raise InputError(f"MLP {n} does not exist: the MLPs are m0 .. m{lm.n_layers - 1}"
                             if not lm.attn_only else "this model is attention-only: no MLP to project")
        w_out = lm.model.blocks[n.layer].mlp.W_out.detach().to(torch.float64).cpu()
        if neuron is None or not 0 <= neuron < w_out.shape[0]:
            raise InputError(f"give a neuron index 0..{w_out.shape[0] - 1} for MLP {n}")
        up, dn = _top_tokens(lm, w_out[neuron] @ w_u, ids, top_k)
        return VocabProjectionOut(node=n, neuron=neuron, rows=[ProjectionRow(input=f"neuron {neuron}", promoted=up,
                                                                             suppressed=dn)],
                                  note=f"W_out row through the unembedding; {vocab_note}; {wts.note}")
    if neuron is not None:
        raise InputError("neuron is only for MLP nodes mL")
    h = _head_node(lm, n)
    assert h.layer is not None and h.head is not None
    ov = wts.W_V[h.layer][h.head] @ wts.W_O[h.layer][h.head]  # [d, d]
    rows = []
    if input_ids:
        d_vocab = int(lm.model.cfg.d_vocab)
        for t in input_ids:
            if not 0 <= int(t) < d_vocab:
                raise InputError(f"input token id {t} is outside the vocabulary 0..{d_vocab - 1}")
            up, dn = _top_tokens(lm, wts.W_E[int(t)] @ ov @ w_u, ids, top_k)
            rows.append(ProjectionRow(input=_tok_str(lm, int(t)), promoted=up, suppressed=dn))
        how = "W_E[input] W_V W_O W_U"
    else:
        diag = ((wts.W_E[ids] @ ov) * w_u.T).sum(-1)  # each token's effect on its own logit
        up, dn = _top_tokens(lm, diag, ids, top_k)
        rows.append(ProjectionRow(input="diagonal (token -> itself)", promoted=up, suppressed=dn))
        how = "diagonal of W_E W_V W_O W_U: tokens copied (promoted) / suppressed onto themselves"
    return VocabProjectionOut(node=h, neuron=None, rows=rows, note=f"{how}; {vocab_note}; {wts.note}")


# ============================================================================= verify a role
def _final_scale_hook(lm: LoadedModel) -> str | None:
    """The hook of the final norm's scale (1/norm factor), if the model has one (TransformerLens' own name: the
    Site vocabulary has no site for it, as in :mod:`autoexplain.tools.lens`)."""
    ln = getattr(lm.model, "ln_final", None)
    hook = getattr(ln, "hook_scale", None)
    return None if hook is None else str(hook.name)


def _run_capture(lm: LoadedModel, tokens: torch.Tensor, sites: Sequence[Site],
                 edits: Sequence[tuple[Site, Callable[[torch.Tensor, Any], torch.Tensor | None]]] = (), *,
                 logits: bool = True, extra_hooks: Sequence[str] = ()
                 ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Run with ``edits`` (site, fn) applied and capture ``sites``' activations; returns (logits, acts by hook
    name). The optional hooks both need are switched on for the pass only. Without ``logits`` the pass stops after
    the last layer a site or edit names (no unembedding: most of the cost on big vocabularies)."""
    got: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        got[hook.name] = act.detach().clone()

    names = [lm.validate_site(s) for s in sites] + list(extra_hooks)
    fwd = [(lm.validate_site(site), fn) for site, fn in edits]
    every = [*sites, *(site for site, _ in edits)]
    stop = None if logits or not every else max(site.layer for site in every) + 1
    with lm.sites_enabled(every), torch.no_grad():
        out = lm.model.run_with_hooks(tokens, fwd_hooks=[*fwd, *((n, grab) for n in dict.fromkeys(names))],
                                      stop_at_layer=stop)
    return (out if logits else None), got


def _derange_first_half(tokens: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7919)
    while True:
        perm = torch.randperm(k, generator=g)
        if bool((perm != torch.arange(k)).all()):
            break
    out = tokens.clone()
    out[:, 1:k + 1] = tokens[:, 1:k + 1][:, perm.to(tokens.device)]
    return out


def _set_head(layer_head: int, value: torch.Tensor, positions: slice | None = None
              ) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        if positions is None:
            act[:, :, layer_head] = value
        else:
            act[:, positions, layer_head] = value
        return act
    return fn


def _head_score(pattern: torch.Tensor, head: int, role: HeadRole, k: int) -> float:
    pat = pattern[None, :, :].float().cpu()  # [1, n, head, q, key]
    return float(_attention_scores(pat, k)[role][0, head])


def _check(node: Node, role: HeadRole, claim: str, base: float | None, min_score: float, effect: float | None,
           threshold: float, method: str, details: dict[str, Any]) -> RoleCheck:
    details = {**details, "base_score": None if base is None else round_sig(base), "min_score": min_score}
    if effect is None:
        return RoleCheck(node=str(node), role=role, claim=claim, verified=None, effect=None, threshold=threshold,
                         method=method, details=details)
    if base is None:
        details["reason"] = f"the head's {role.value} detector score is not computable (see head_roles)"
    elif base < min_score:
        details["reason"] = f"the head's {role.value} score {base:.3g} is below min_score {min_score}"
    verified = base is not None and base >= min_score and effect >= threshold
    return RoleCheck(node=str(node), role=role, claim=claim, verified=verified, effect=round_sig(effect),
                     threshold=threshold, method=method, details=details)


_DEFAULT_THRESHOLD = {HeadRole.INDUCTION: 0.5, HeadRole.DUPLICATE_TOKEN: 0.5, HeadRole.PREVIOUS_TOKEN: 0.5,
                      HeadRole.ATTENDS_BOS: 0.5, HeadRole.COPYING: 0.2, HeadRole.SUPPRESSION: 0.2}
_LOSS_THRESHOLD = 0.05


def verify_role(lm: LoadedModel, node: Node | str, role: HeadRole | str, *, n_seqs: int = 32,
                half_len: int | None = None, seed: int = 0, threshold: float | None = None, min_score: float = 0.3,
                prompts: Sequence[Sequence[int]] | None = None) -> RoleCheck:
    """Check the claim "``node`` is a ``role`` head" by an intervention (module doc, one check per role)."""
    n = _head_node(lm, node)
    try:
        r = HeadRole(role)
    except ValueError:
        raise InputError(f"unknown role {role!r}: the roles are {', '.join(x.value for x in HeadRole)}") from None
    assert n.layer is not None and n.head is not None
    layer, head = n.layer, n.head
    if prompts is not None and r not in OV_ROLES:
        raise InputError(f"prompts apply to the copying and suppression checks only; the {r.value} check runs on "
                         "repeated random sequences (drop prompts)")
    thr = _DEFAULT_THRESHOLD[r] if threshold is None else threshold
    article = "an" if r.value[0] in "aeiou" else "a"
    claim = f"{n} is {article} {r.value.replace('_', '-')} head"
    tokens, k, seq = repeated_sequences(lm, n_seqs, half_len, seed)
    pat_site = Site(kind=SiteKind.PATTERN, layer=layer)
    pat_name = hook_name(pat_site)

    n_kv = getattr(lm.model.cfg, "n_key_value_heads", None)
    if n_kv not in (None, lm.n_heads) and r in (HeadRole.INDUCTION, HeadRole.DUPLICATE_TOKEN,
                                                HeadRole.ATTENDS_BOS):
        return _check(n, r, claim, None, min_score, None, thr, "none",
                      {**seq, "reason": "grouped-query attention: a key is shared by several heads, so patching it "
                                        "is not a per-head intervention"})
    if r in (HeadRole.INDUCTION, HeadRole.DUPLICATE_TOKEN):
        k_site = Site(kind=SiteKind.K_IN, layer=layer, head=head)
        shuffled = _derange_first_half(tokens, k, seed)
        _, clean = _run_capture(lm, tokens, [pat_site], logits=False)
        _, alt = _run_capture(lm, shuffled, [k_site], logits=False)
        k_name = hook_name(k_site)
        _, patched = _run_capture(lm, tokens, [pat_site], [(k_site, _set_head(head, alt[k_name][:, :, head]))],
                                  logits=False)
        base = _head_score(clean[pat_name], head, r, k)
        after = _head_score(patched[pat_name], head, r, k)
        effect = (base - after) / base if base > 0 else 0.0  # no attention of this kind to lose
        method = (f"patch k_in of {n} with its value on the same sequences with the first half deranged; relative "
                  f"drop of the {r.value} attention")
        return _check(n, r, claim, base, min_score, effect, thr, method,
                      {**seq, "score_after": round_sig(after)})

    if r is HeadRole.ATTENDS_BOS:
        k_site = Site(kind=SiteKind.K_IN, layer=layer, head=head)
        _, clean = _run_capture(lm, tokens, [pat_site, k_site], logits=False)
        k_name = hook_name(k_site)
        mean_key = clean[k_name][:, 1:, head].mean(dim=1, keepdim=True)  # [n, 1, d]
        _, patched = _run_capture(lm, tokens, [pat_site],
                                  [(k_site, _set_head(head, mean_key, positions=slice(0, 1)))], logits=False)
        base = _head_score(clean[pat_name], head, r, k)
        after = _head_score(patched[pat_name], head, r, k)
        effect = (base - after) / base if base > 0 else 0.0  # no attention of this kind to lose
        return _check(n, r, claim, base, min_score, effect, thr,
                      f"replace the key input of {n} at position 0 by its mean over the other positions; relative "
                      "drop of the attention to position 0", {**seq, "score_after": round_sig(after)})

    z_site = Site(kind=SiteKind.Z, layer=layer)
    z_name = hook_name(z_site)
    run_tokens = tokens
    if prompts is not None:
        rows = _prompt_ids(lm, None, prompts, False)
        width = len(rows[0][1])
        if any(len(ids) != width for _, ids in rows):
            raise InputError("prompts for verify_role must all have the same length (no padding is applied)")
        run_tokens = torch.tensor([ids for _, ids in rows], device=lm.device)
        seq = {"prompts": len(rows), "seq_len": width}
    def mean_ablation(z: torch.Tensor) -> tuple[Site, Callable[[torch.Tensor, Any], torch.Tensor]]:
        """Replace the head's z by its mean over the sequences, per position."""
        return z_site, _set_head(head, z[:, :, head].mean(dim=0, keepdim=True).expand_as(z[:, :, head]))

    if r is HeadRole.PREVIOUS_TOKEN:
        pat_sites = [Site(kind=SiteKind.PATTERN, layer=layer2) for layer2 in range(layer + 1, lm.n_layers)]
        _, clean = _run_capture(lm, tokens, [pat_site, z_site, *pat_sites], logits=False)
        base = _head_score(clean[pat_name], head, r, k)
        if not pat_sites:
            return _check(n, r, claim, base, min_score, None, thr, "none",
                          {**seq, "reason": "the head is in the last layer: nothing downstream reads it"})
        ablate = mean_ablation(clean[z_name])
        _, after_all = _run_capture(lm, tokens, pat_sites, [ablate], logits=False)
        later = [s for s in composition_scores(lm, src=n)
                 if s.kind == "k" and s.score >= COMPOSITION_RATIO * s.baseline]
        drops: dict[str, dict[str, float]] = {}
        for c in later:
            assert c.dst.layer is not None and c.dst.head is not None
            pn = hook_name(Site(kind=SiteKind.PATTERN, layer=c.dst.layer))
            b = _head_score(clean[pn], c.dst.head, HeadRole.INDUCTION, k)
            if b < min_score:
                continue
            a = _head_score(after_all[pn], c.dst.head, HeadRole.INDUCTION, k)
            drops[str(c.dst)] = {"induction_before": round_sig(b), "induction_after": round_sig(a),
                                 "relative_drop": round_sig((b - a) / b), "k_composition": c.score,
                                 "baseline": c.baseline}
        if drops:
            effect = max(d["relative_drop"] for d in drops.values())
            return _check(n, r, claim, base, min_score, effect, thr,
                          f"mean-ablate {n}'s output; largest relative drop of the induction score of later heads "
                          "that K-compose with it", {**seq, "downstream": drops})
        second = torch.arange(k + 1, 2 * k, device=tokens.device)  # positions k+1 .. 2k-1 predict k+2 .. 2k
        tgt = tokens[:, second + 1]

        def loss(edits: Sequence[tuple[Site, Callable[[torch.Tensor, Any], torch.Tensor]]]) -> float:
            lg, _ = _run_capture(lm, tokens, [], edits)
            assert lg is not None
            return float(torch.nn.functional.cross_entropy(lg[:, second].float().flatten(0, 1), tgt.flatten()))

        effect = loss([ablate]) - loss([])
        return _check(n, r, claim, base, min_score, effect, _LOSS_THRESHOLD if threshold is None else threshold,
                      f"mean-ablate {n}'s output; increase of next-token loss (nats) on the repeated half (no later "
                      "induction head K-composes with it)", {**seq})

    # copying / suppression: attention-weighted change of the attended tokens' centred logits
    scale_name = _final_scale_hook(lm)
    scale_site = [] if scale_name is None else [scale_name]
    logits, clean = _run_capture(lm, run_tokens, [pat_site, z_site], extra_hooks=scale_site)
    abl_logits, _ = _run_capture(lm, run_tokens, [], [mean_ablation(clean[z_name])])
    assert logits is not None and abl_logits is not None
    pat = clean[pat_name][:, head].float()  # [n, q, key]
    src_tok = run_tokens[:, None, :].expand(-1, pat.shape[1], -1)  # [n, q, key]

    def attended(lg: torch.Tensor) -> torch.Tensor:
        """Centred logit (logit - mean logit) at each query of each key position's token: [n, q, key]."""
        lg = lg.float()
        return torch.gather(lg, 2, src_tok) - lg.mean(-1, keepdim=True)

    d_att = attended(logits) - attended(abl_logits)  # clean - ablated
    w = pat[:, 1:, 1:]  # queries >= 1, keys >= 1 (BOS excluded)
    total = float(w.sum())
    if total <= 1e-9:
        return _check(n, r, claim, 0.0, min_score, None, thr, "none",
                      {**seq, "reason": "the head attends only to BOS on these inputs: no attended token to follow"})
    mean_delta = float((w * d_att[:, 1:, 1:]).sum()) / total
    sign = 1.0 if r is HeadRole.COPYING else -1.0
    # the direct path alone (head -> logits, final norm scale frozen at the clean run's): separates what the head
    # writes from effects through later layers and from the norm's rescaling of every logit
    z = clean[z_name][:, :, head].double().cpu()
    w_o = lm.model.blocks[layer].attn.W_O[head].detach().double().cpu()
    d_out = (z - z.mean(dim=0, keepdim=True)) @ w_o  # clean - mean-ablated head output, [n, q, d]
    scale = clean[scale_name].double().cpu() if scale_name is not None else torch.ones(*d_out.shape[:2], 1,
                                                                                        dtype=torch.float64)
    d_logits = (d_out / scale) @ effective_weights(lm).W_U  # [n, q, vocab]
    d_direct = torch.gather(d_logits, 2, src_tok.cpu()) - d_logits.mean(-1, keepdim=True)
    direct = float((w.cpu().double() * d_direct[:, 1:, 1:]).sum()) / total
    ov_base = {s.role: s.score for s in ov_eigen_scores(lm) if s.node == n}.get(r)
    what = "fall" if r is HeadRole.COPYING else "rise"
    return _check(n, r, claim, ov_base, min_score, sign * mean_delta, thr,
                  f"mean-ablate {n}'s output; attention-weighted change of the centred logits of the attended "
                  f"tokens (nats; they must {what} when the head is removed)",
                  {**seq, "attention_off_bos": round_sig(total / float(pat[:, 1:].sum())),
                   "direct_effect": round_sig(sign * direct),
                   "direct_effect_note": "the same measure through the head's direct path to the logits only (final "
                                         "norm scale frozen); total and direct disagree when later layers or the "
                                         "norm's rescaling carry the effect"})


# ============================================================================= tool specs
class HeadRolesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_seqs: int = Field(32, ge=1, le=512, description="repeated random sequences for the attention scores")
    half_len: int | None = Field(None, ge=2, description="tokens per half (default min(20, (n_ctx - 1) // 2))")
    seed: int = 0
    cut: float = Field(0.5, gt=0, le=1, description="a role is notable when its score reaches this")
    composition_ratio: float = Field(COMPOSITION_RATIO, gt=0,
                                     description="composition edges kept: score >= ratio x baseline")


def _head_roles_tool(ctx: ToolContext, args: HeadRolesIn) -> RoleTable:
    return role_table(ctx.model, n_seqs=args.n_seqs, half_len=args.half_len, seed=args.seed, cut=args.cut,
                      composition_ratio=args.composition_ratio)


class AttentionPatternIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] | None = Field(None, max_length=16)
    token_ids: list[list[int]] | None = Field(None, max_length=16)
    heads: list[Node] | None = Field(None, description="heads aL.H (default: all)")
    positions: list[int] | None = Field(None, max_length=16, description="query positions (default: the last); "
                                                                        "negative counts from the end")
    top_k: int = Field(5, ge=1, le=32)
    prepend_bos: bool = True


def _attention_tool(ctx: ToolContext, args: AttentionPatternIn) -> AttentionPatternOut:
    prompts = _prompt_ids(ctx.model, args.texts, args.token_ids, args.prepend_bos)
    return attention_patterns(ctx.model, prompts, args.heads, args.positions, args.top_k)


class CompositionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kinds: list[QKV] = Field(default=["q", "k", "v"])
    min_ratio: float = Field(0.0, ge=0, description="keep pairs with score >= min_ratio x baseline")
    top_n: int = Field(20, ge=1, le=500)


class CompositionOut(ToolOutput):
    scores: list[CompositionScore]
    n_pairs: int
    baseline: float | None

    def summary_text(self) -> str:
        lines = [f"composition scores (Elhage et al., weights only, association; random baseline "
                 f"{self.baseline}; {len(self.scores)} of {self.n_pairs} pairs shown, by score/baseline):"]
        lines += [f"{c.src}->{c.dst}.{c.kind}: {c.score:.3g} ({c.ratio:.2f}x baseline)" for c in self.scores[:30]]
        return "\n".join(lines)


def _composition_tool(ctx: ToolContext, args: CompositionIn) -> CompositionOut:
    every = composition_scores(ctx.model)
    kept = sorted((c for c in every if c.kind in args.kinds and c.score >= args.min_ratio * c.baseline),
                  key=lambda c: -c.ratio)
    return CompositionOut(scores=kept[: args.top_n], n_pairs=len(every),
                          baseline=every[0].baseline if every else None)


class VocabProjectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: Node = Field(description="a head aL.H, or an MLP mL with neuron")
    neuron: int | None = Field(None, ge=0)
    tokens: list[str] | None = Field(None, max_length=16, description="input tokens (single tokens, as text)")
    token_ids: list[int] | None = Field(None, max_length=16)
    top_k: int = Field(10, ge=1, le=50)


def _vocab_tool(ctx: ToolContext, args: VocabProjectionIn) -> VocabProjectionOut:
    lm = ctx.model
    ids = list(args.token_ids or [])
    for t in args.tokens or []:
        if lm.tokenizer is None:
            raise InputError("this model has no tokenizer: give token_ids")
        enc = lm.tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise InputError(f"token {t!r} is {len(enc)} tokens; give single tokens (mind the leading space)")
        ids.append(int(enc[0]))
    return vocab_projection(lm, args.node, neuron=args.neuron, input_ids=ids or None, top_k=args.top_k)


class VerifyRoleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: Node
    role: HeadRole
    n_seqs: int = Field(32, ge=1, le=512)
    half_len: int | None = Field(None, ge=2)
    seed: int = 0
    threshold: float | None = Field(None, description="effect needed (default per role, see the tool description)")
    min_score: float = Field(0.3, ge=0, le=1)
    prompts: list[list[int]] | None = Field(None, max_length=256, description="token-id prompts of equal length "
                                                                              "(copying/suppression only)")


class VerifyRoleOut(ToolOutput):
    check: RoleCheck

    def summary_text(self) -> str:
        c = self.check
        verdict = {True: "VERIFIED", False: "NOT verified", None: "NOT CHECKABLE"}[c.verified]
        reason = c.details.get("reason")
        return (f"{verdict}: {c.claim} (intervention). effect {c.effect} vs threshold {c.threshold}; detector score "
                f"{c.details.get('base_score')} (min {c.details.get('min_score')}). method: {c.method}"
                + (f". note: {reason}" if reason else ""))


def _verify_tool(ctx: ToolContext, args: VerifyRoleIn) -> VerifyRoleOut:
    return VerifyRoleOut(check=verify_role(ctx.model, args.node, args.role, n_seqs=args.n_seqs,
                                           half_len=args.half_len, seed=args.seed, threshold=args.threshold,
                                           min_score=args.min_score, prompts=args.prompts))


TOOLS = (
    ToolSpec(name="head_roles", level=CausalLevel.ASSOCIATION, input_model=HeadRolesIn, output_model=RoleTable,
             fn=_head_roles_tool, cost=Cost.FORWARD,
             description="Role table of every attention head: previous-token, duplicate-token, induction and "
                         "attends-BOS scores (mean attention on repeated random token sequences), copying and "
                         "suppression scores (eigenvalues of the head's OV circuit W_E W_V W_O W_U), the best role "
                         "per head and Q/K/V-composition edges above a random baseline. Scores in [0,1]. "
                         "Association only (random sequences are off-distribution); confirm with verify_head_role."),
    ToolSpec(name="attention_pattern", level=CausalLevel.ASSOCIATION, input_model=AttentionPatternIn,
             output_model=AttentionPatternOut, fn=_attention_tool, cost=Cost.FORWARD,
             description="Where heads attend on given prompts (texts or token ids): the top attended positions and "
                         "tokens per head at chosen query positions (default the last). Association only."),
    ToolSpec(name="composition_scores", level=CausalLevel.ASSOCIATION, input_model=CompositionIn,
             output_model=CompositionOut, fn=_composition_tool, cost=Cost.CHEAP,
             description="Q-, K- and V-composition scores (Elhage et al.) between every pair of heads in different "
                         "layers, with the score of random matrices of the same shapes as baseline; sorted by "
                         "score/baseline. Weights only (LN weights folded, LN scale ignored): association."),
    ToolSpec(name="vocab_projection", level=CausalLevel.ASSOCIATION, input_model=VocabProjectionIn,
             output_model=VocabProjectionOut, fn=_vocab_tool, cost=Cost.CHEAP,
             description="Project a component onto the vocabulary: for a head, the output tokens its OV circuit "
                         "promotes / suppresses for given input tokens (or the tokens it copies / suppresses onto "
                         "themselves); for an MLP mL and a neuron, the tokens its output weights promote / "
                         "suppress through the unembedding. Direct path only: association."),
    ToolSpec(name="verify_head_role", level=CausalLevel.INTERVENTION, input_model=VerifyRoleIn,
             output_model=VerifyRoleOut, fn=_verify_tool, cost=Cost.FORWARD,
             description="Check a claimed head role by intervention. induction / duplicate_token: patch the head's "
                         "key input from sequences with the first half shuffled, the role's attention must drop "
                         "by half; previous_token: mean-ablate the head, the induction score of later heads that "
                         "K-compose with it must drop by half (else next-token loss must rise 0.05 nats); copying / "
                         "suppression: mean-ablate the head, the attended tokens' logits must fall / rise by 0.2 "
                         "nats; attends_bos: replace the key at position 0 by the mean key, the BOS attention must "
                         "drop by half. Verified also needs the role's detector score >= min_score."),
)

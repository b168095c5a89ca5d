"""Load a language model for interpretability work and check that every site we use exists and fires.

Runtime choice
--------------
TransformerLens 3.9 offers two runtimes: the deprecated ``HookedTransformer`` (removed in 4.0) and the new
``TransformerBridge``. We use ``HookedSAETransformer`` (sae-lens' subclass of ``HookedTransformer``) because
sae-lens' splicing (``run_with_saes``) and the per-head hooks we patch in circuit work (``hook_result``, split
q/k/v inputs) are mature there. That choice lives in this module alone: everything else asks for a :class:`Site`
and this module turns it into a hook name (:func:`hook_name`). When TL 4.0 lands, only this file moves.

Model specs
-----------
* a local Hugging Face directory (``save_pretrained`` output: GPT-2, GPT-NeoX/Pythia, Llama-family …): loaded
  with transformers, converted with TransformerLens' weight converters, no weight processing (so logits equal the
  plain transformers model's). TL's ``from_pretrained`` refuses local paths, hence the manual recipe.
* a hub name TransformerLens knows (``gpt2``, ``EleutherAI/pythia-70m``): resolved the libraries' own way
  (TransformerLens' ``get_official_model_name`` maps the name to its hub repo, ``huggingface_hub`` finds that repo's
  snapshot in the local cache, ``HF_HUB_CACHE``/``HF_HOME``). A cached snapshot (config + weights) is loaded from the
  cache with the hub switched off for the duration of the load, online or offline, so a cached model never waits on
  the network (caveat: a newer revision on the hub is not picked up; refresh it with ``hf download``). A name that is
  not cached is fetched where the hub is reachable; one that is neither cached nor reachable is refused with one
  line naming the cache directory and why the hub is unavailable.
* ``toy:NAME``: a model of the toy zoo, built on first use. The zoo builds its models with this module, so this
  module does not know the zoo: :func:`autoexplain.tools.loading.load_model` resolves ``toy:`` specs to a local
  directory and loads that here. Callers that take a spec from a user load through
  :mod:`autoexplain.tools.loading`.

Weight processing
-----------------
By default no processing is applied, so activations equal the plain transformers model's. An SAE trained on a
*processed* model (sae-lens' ``model_from_pretrained_kwargs``, e.g. ``center_writing_weights``) sees other
activations there (centring writing weights removes the mean component of every residual write), so
:func:`load_model` takes ``processing``, the TransformerLens flags the SAEs ask for
(:data:`PROCESSING_FLAGS`). Hub names are loaded as sae-lens loads them for training,
``HookedSAETransformer.from_pretrained_no_processing(name, **flags)``; local directories pass the same flags to
``load_and_process_state_dict``. A processed model gets a model id with the flags appended
(``gpt2+center_writing_weights``): its activations differ, and harvest identity and reuse key on the model id.
An unprocessed load keeps the plain id, so existing databases still match.

Architectures
-------------
autoexplain explains causal language models; :func:`check_model_spec` reads ``config.json`` (``architectures``,
``model_type``, ``is_encoder_decoder``) and refuses encoders (BERT …) and encoder-decoders (T5 …) before any weight
is read.

Caveat: optional hooks (per-head outputs, split q/k/v inputs, MLP input) cost memory and time, so they are off by
default and switched on only inside :meth:`LoadedModel.sites_enabled` for the sites a tool asks for.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autoexplain.tools.device import pick_device
from autoexplain.tools.errors import InputError
from autoexplain.tools.vocab import HEAD_KINDS, MLP_KINDS, Site, SiteKind

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

# ----------------------------------------------------------------------------- site <-> hook name (one place)
_LAYER_HOOKS: dict[SiteKind, str] = {
    SiteKind.RESID_PRE: "blocks.{L}.hook_resid_pre",
    SiteKind.RESID_MID: "blocks.{L}.hook_resid_mid",
    SiteKind.RESID_POST: "blocks.{L}.hook_resid_post",
    SiteKind.ATTN_OUT: "blocks.{L}.hook_attn_out",
    SiteKind.MLP_IN: "blocks.{L}.hook_mlp_in",
    SiteKind.MLP_OUT: "blocks.{L}.hook_mlp_out",
    SiteKind.MLP_POST: "blocks.{L}.mlp.hook_post",
    SiteKind.Z: "blocks.{L}.attn.hook_z",
    SiteKind.PATTERN: "blocks.{L}.attn.hook_pattern",
    # per-head kinds: one hook per layer, the head is an index into dim 2 ([batch, pos, head, d])
    SiteKind.HEAD_OUT: "blocks.{L}.attn.hook_result",
    SiteKind.Q_IN: "blocks.{L}.hook_q_input",
    SiteKind.K_IN: "blocks.{L}.hook_k_input",
    SiteKind.V_IN: "blocks.{L}.hook_v_input",
}

#: The TransformerLens config switch that makes an optional hook fire.
_SITE_FLAGS: dict[SiteKind, str] = {
    SiteKind.HEAD_OUT: "use_attn_result",
    SiteKind.Q_IN: "use_split_qkv_input",
    SiteKind.K_IN: "use_split_qkv_input",
    SiteKind.V_IN: "use_split_qkv_input",
    SiteKind.MLP_IN: "use_hook_mlp_in",
}


def hook_name(site: Site) -> str:
    """The runtime hook name of ``site``. Per-head sites share their layer's hook; the head indexes dim 2."""
    return _LAYER_HOOKS[site.kind].format(L=site.layer)


def site_from_hook_name(name: str) -> Site:
    """Inverse of :func:`hook_name` for layer-level sites (what an SAE's ``hook_name`` points at)."""
    for kind, pattern in _LAYER_HOOKS.items():
        if kind in HEAD_KINDS:
            continue
        prefix, suffix = pattern.split("{L}")
        if name.startswith(prefix) and name.endswith(suffix):
            middle = name[len(prefix) : len(name) - len(suffix)]
            if middle.isdigit():
                return Site(kind=kind, layer=int(middle))
    known = ", ".join(p.format(L="L") for k, p in _LAYER_HOOKS.items() if k not in HEAD_KINDS)
    raise InputError(f"hook {name!r} is not a site autoexplain knows: use one of {known}")


# ----------------------------------------------------------------------------- the loaded model
@dataclass
class LoadedModel:
    """A HookedSAETransformer plus what the tools need to know about it."""

    spec: str
    model_id: str
    model: HookedSAETransformer  # a transformer_lens.HookedTransformer
    tokenizer: Any
    device: torch.device
    source_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: the TransformerLens processing flags the weights were loaded with (only those switched on); {} = none
    processing: dict[str, bool] = field(default_factory=dict)

    # -- shape ----------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.model.cfg.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def n_ctx(self) -> int:
        return int(self.model.cfg.n_ctx)

    @property
    def attn_only(self) -> bool:
        return bool(self.model.cfg.attn_only)

    def sites(self, kinds: Iterable[SiteKind] | None = None) -> list[Site]:
        """Every site this model has (optionally of some kinds), in forward order."""
        kinds = list(SiteKind) if kinds is None else list(kinds)
        out: list[Site] = []
        for layer in range(self.n_layers):
            for kind in kinds:
                if self.attn_only and kind in MLP_KINDS:
                    continue
                if _LAYER_HOOKS[kind].format(L=layer) not in self.model.hook_dict:
                    continue  # e.g. no resid_mid in parallel attention+MLP blocks (GPT-NeoX, GPT-J)
                if kind in HEAD_KINDS:
                    out.extend(Site(kind=kind, layer=layer, head=h) for h in range(self.n_heads))
                else:
                    out.append(Site(kind=kind, layer=layer))
        return out

    def validate_site(self, site: Site) -> str:
        """Raise :class:`InputError` unless ``site`` exists in this model; return its hook name."""
        if site.layer >= self.n_layers:
            raise InputError(f"site {site} does not exist: the model has layers 0..{self.n_layers - 1}")
        if site.head is not None and site.head >= self.n_heads:
            raise InputError(f"site {site} does not exist: the model has heads 0..{self.n_heads - 1} per layer")
        if self.attn_only and site.kind in MLP_KINDS:
            raise InputError(f"site {site} does not exist: this model is attention-only (no MLPs)")
        name = hook_name(site)
        if name not in self.model.hook_dict:
            raise InputError(f"site {site} (hook {name}) does not exist in this model")
        return name

    # -- optional hooks -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def sites_enabled(self, sites: Iterable[Site]) -> Iterator[None]:
        """Switch on the optional TransformerLens hooks these sites need, and restore the previous state."""
        flags = {_SITE_FLAGS[s.kind] for s in sites if s.kind in _SITE_FLAGS}
        before = {f: bool(getattr(self.model.cfg, f)) for f in flags}
        try:
            for f in flags:
                getattr(self.model, f"set_{f}")(True)
            yield
        finally:
            for f, v in before.items():
                getattr(self.model, f"set_{f}")(v)

    def check_sites(self, sites: Iterable[Site] | None = None) -> list[Site]:
        """Check that each site exists and that its hook fires on a short forward pass; return the sites.

        A hook can be registered and still never fire (TransformerLens keeps ``hook_mlp_out`` in attention-only
        models; split q/k/v input hooks fire only when enabled). Such a site is refused here instead of
        silently producing no data later.
        """
        sites = self.sites() if sites is None else list(sites)
        names = {s: self.validate_site(s) for s in sites}
        fired: set[str] = set()

        def record(_act: torch.Tensor, hook: Any) -> None:
            fired.add(hook.name)

        probe = torch.arange(1, 1 + min(4, self.n_ctx), device=self.device)[None, :] % self.model.cfg.d_vocab
        with self.sites_enabled(sites), torch.no_grad():
            self.model.run_with_hooks(probe, fwd_hooks=[(n, record) for n in set(names.values())])
        silent = [s for s, n in names.items() if n not in fired]
        if silent:
            listed = ", ".join(str(s) for s in silent[:5])
            raise InputError(f"sites {listed} exist in the model but their hooks never fire: this runtime "
                             "cannot read or patch them; choose another site")
        return sites

    def token_str(self, token_id: int) -> str:
        """The readable text of one token id (decoded once, then cached); ids the tokenizer lacks (padded
        vocabulary rows) read ``<id N>``."""
        cache = self.meta.setdefault("_token_strs", {})
        token_id = int(token_id)
        if token_id not in cache:
            try:
                cache[token_id] = self.tokenizer.decode([token_id]) if token_id < len(self.tokenizer) else None
            except (IndexError, KeyError, ValueError, TypeError, OverflowError):
                cache[token_id] = None
            if cache[token_id] is None:
                cache[token_id] = f"<id {token_id}>"
        return cache[token_id]

    @property
    def pad_id(self) -> int:
        """The id padding is written with (the data module's rule: pad token, else EOS, else 0)."""
        from autoexplain.tools.data import _pad_id

        return _pad_id(self.tokenizer)

    def token_strs(self, ids: Iterable[int]) -> list[str]:
        return [self.token_str(i) for i in ids]

    def to_tokens(self, texts: str | list[str], prepend_bos: bool = True, truncate: bool = True) -> torch.Tensor:
        """Tokenise like the model's own ``to_tokens`` (BOS prepended by default, right-padded; cut to the context
        unless ``truncate`` is False)."""
        return self.model.to_tokens(texts, prepend_bos=prepend_bos, truncate=truncate).to(self.device)

    def describe(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {
            "spec": self.spec, "model_id": self.model_id, "architecture": cfg.original_architecture,
            "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model, "d_head": cfg.d_head,
            "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx, "attn_only": bool(cfg.attn_only),
            "device": str(self.device), "processing": sorted(self.processing),
            **{k: v for k, v in self.meta.items() if not k.startswith("_")},
        }


# ----------------------------------------------------------------------------- loading
#: The prefix of toy-zoo specs (``toy:NAME``), resolved by :mod:`autoexplain.tools.loading`.
TOY_PREFIX = "toy:"


#: TransformerLens' weight-processing switches (``from_pretrained`` / ``load_and_process_state_dict`` keywords).
#: ``fold_ln``, ``center_writing_weights`` and ``fold_value_biases`` change what the hooks read (residual stream,
#: attention outputs); ``center_unembed`` changes only logits; ``refactor_factored_attn_matrices`` changes q/k/v.
PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                    "refactor_factored_attn_matrices")


def normalize_processing(processing: Mapping[str, Any] | None) -> dict[str, bool]:
    """The flags of ``processing`` that are switched on (``{}`` for no processing); unknown keys are a bug here
    (:func:`autoexplain.tools.saes.model_settings` refuses them at the boundary)."""
    out: dict[str, bool] = {}
    for key, value in (processing or {}).items():
        if key not in PROCESSING_FLAGS:
            raise ValueError(f"unknown processing flag {key!r}; known: {', '.join(PROCESSING_FLAGS)}")
        if value:
            out[key] = True
    return dict(sorted(out.items()))


def processed_model_id(base: str, processing: Mapping[str, Any] | None) -> str:
    """``base`` for an unprocessed load, else ``base+flag+flag`` (sorted): the id changes with the activations."""
    flags = normalize_processing(processing)
    return "+".join([base, *flags]) if flags else base


def load_model(spec: str, device: str | None = None, *, check: bool = True,
               processing: Mapping[str, Any] | None = None) -> LoadedModel:
    """Load ``spec`` (a local HF directory or a hub name) onto CUDA when present, else CPU; ``check``: check that
    every site fires (:meth:`LoadedModel.check_sites`); ``processing``: TransformerLens weight processing
    (:data:`PROCESSING_FLAGS`, e.g. ``{"center_writing_weights": True}``) as an SAE's training asked for it;
    ``None``/``{}`` loads unprocessed weights (logits equal the transformers model's).

    Raises :class:`InputError` for anything the user can fix: a missing path, a directory that holds no model,
    an encoder or an architecture TransformerLens cannot convert, a hub name neither cached nor reachable.
    ``toy:NAME`` specs are loaded by :func:`autoexplain.tools.loading.load_model`.
    """
    dev = pick_device(device)
    spec = spec.strip()
    flags = normalize_processing(processing)
    check_model_spec(spec)
    path = Path(spec).expanduser()
    if path.exists():
        lm = _load_local(path, dev, spec=spec, processing=flags)
    else:
        lm = _load_hub(spec, dev, processing=flags)
    lm.processing = flags
    lm.model_id = processed_model_id(lm.model_id, flags)
    return _checked(lm, check)


def check_model_spec(spec: str) -> None:
    """Refuse a model spec that cannot load, without loading any weights (one :class:`InputError` line).

    Local directories: exist, are directories, hold a readable ``config.json`` and weights, and describe a causal
    LM. Hub names: known to TransformerLens, a causal LM (by the cached ``config.json`` when there is one, else by
    TransformerLens' own encoder rule), and either cached or with the hub reachable.
    """
    spec = spec.strip()
    if not spec:
        raise InputError("empty model spec: pass a local model directory, a hub name or toy:NAME")
    if spec.startswith(TOY_PREFIX):
        raise InputError(f"{spec!r} is a toy-zoo spec: load it with autoexplain.tools.loading.load_model, which "
                         "builds the toy model on first use")
    path = Path(spec).expanduser()
    if path.exists():
        _check_local_dir(path)
        return
    if spec.startswith(("/", "./", "../", "~")) or os.sep in spec and spec.count("/") > 1:
        raise InputError(f"model path {spec!r} does not exist: pass an existing directory saved with "
                         "save_pretrained, a hub name such as gpt2, or toy:tiny")
    repo = hub_repo(spec)
    snapshot = cached_model_snapshot(repo)
    if snapshot is not None:
        _check_causal_lm(_read_config(snapshot / "config.json"), f"{spec!r} (cached in {snapshot})", local=False)
        return
    if repo.split("/")[-1].lower().startswith(("bert", "t5")):  # TransformerLens' own rule for its official names
        raise InputError(f"{spec!r} is an encoder model ({repo}): autoexplain explains causal LMs (GPT-2, "
                         "GPT-NeoX/Pythia, Llama-family …); pass a causal LM")
    why = hub_unreachable()
    if why:
        raise InputError(f"model {spec!r} (hub repo {repo}) is not cached in {hf_cache_dir()} and the Hugging Face "
                         f"hub is unavailable ({why}): download it where the hub is reachable (hf download {repo}) "
                         f"or pass a local directory saved with save_pretrained")


def hub_repo(name: str) -> str:
    """The hub repo TransformerLens loads for ``name`` (its official name; ``gpt2-small`` -> ``gpt2``), or
    :class:`InputError` when TransformerLens does not know the name."""
    import transformer_lens.loading_from_pretrained as tl_loading

    try:
        return str(tl_loading.get_official_model_name(name))
    except ValueError:
        raise InputError(f"{name!r} is neither an existing local directory nor a model name TransformerLens knows: "
                         "pass a directory saved with save_pretrained, a name such as gpt2 or "
                         "EleutherAI/pythia-70m, or toy:tiny") from None


def hf_cache_dir() -> str:
    """The Hugging Face hub cache directory in use (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The local snapshot directory of ``repo_id``'s ``main`` revision in the hub cache, or None when the repo is
    not cached; never touches the network (``snapshot_download(local_files_only=True)``). The snapshot may be
    partial: callers check for the files they need."""
    from huggingface_hub import snapshot_download

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError (an OSError), a malformed repo id (HFValidationError)
        return None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def cached_model_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id`` when it holds a ``config.json`` and weights (enough to load offline)."""
    snap = cached_snapshot(repo_id)
    if snap is None or not (snap / "config.json").is_file():
        return None
    if not any(p.suffix in _WEIGHT_SUFFIXES or p.name.endswith(".index.json") for p in snap.iterdir()):
        return None
    return snap


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Switch the hub off for the duration (``huggingface_hub.constants.HF_HUB_OFFLINE``, which transformers and
    huggingface_hub read on every call): everything resolves from the local cache, nothing waits on the network.
    Caveat: process-wide while it lasts."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _read_config(cfg_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(cfg_file)!r} is not valid JSON ({exc.__class__.__name__}); re-save the model") from None
    if not isinstance(data, dict):
        raise InputError(f"{str(cfg_file)!r} is not a model config (a JSON object); re-save the model")
    return data


def _check_local_dir(path: Path) -> dict[str, Any]:
    """A local model directory: a directory with a valid config.json of a causal LM, and weights; its config."""
    if not path.is_dir():
        raise InputError(f"model path {str(path)!r} is a file, not a directory: pass the directory that "
                         "save_pretrained wrote (config.json + weights)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{str(path)!r} is not a model directory: it has no config.json; pass a directory "
                         "written by save_pretrained (config.json, weights and tokenizer)")
    hf_cfg = _read_config(cfg_file)
    _check_causal_lm(hf_cfg, repr(str(path)))
    if not _weight_files(path):
        raise InputError(f"{str(path)!r} has a config.json but no model weights (*.safetensors or *.bin)")
    return hf_cfg


def _weight_files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and "model" in p.name]


def _check_causal_lm(hf_cfg: dict[str, Any], what: str, *, local: bool = True) -> None:
    """Refuse a config that is not a causal LM, reading only ``config.json``.

    Refused: an encoder-decoder (``is_encoder_decoder``, T5/BART); a ``model_type`` that transformers' masked-LM
    mapping lists (BERT, RoBERTa, ELECTRA …: encoders, even where a decoder variant exists, which
    TransformerLens cannot run anyway); ``architectures`` none of which is a causal-LM class (BertModel,
    BertForMaskedLM …). Without ``architectures`` a local directory is refused too, since TransformerLens picks its
    converter from ``architectures[0]``; a hub name is then left to TransformerLens, which also maps names.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = [a for a in hf_cfg.get("architectures") or [] if isinstance(a, str)]
    model_type = str(hf_cfg.get("model_type") or "?")
    named = ", ".join(archs) or "no architectures listed"
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    kind = None
    if hf_cfg.get("is_encoder_decoder"):
        kind = "an encoder-decoder"
    elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        kind = "an encoder, not a causal language model"
    elif archs and not any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        kind = "not a causal language model"
    if kind:
        raise InputError(f"model {what} is {kind} ({named}; model_type {model_type}): autoexplain explains causal "
                         "LMs (GPT-2, GPT-NeoX/Pythia, Llama-family …), which TransformerLens' HookedTransformer "
                         "runs; pass a causal LM checkpoint")
    if not archs and local:
        raise InputError(f"model {what} lists no architectures in config.json (model_type {model_type}), so "
                         "TransformerLens cannot choose a weight converter; re-save it with save_pretrained")


def _checked(lm: LoadedModel, check: bool) -> LoadedModel:
    if check:
        lm.check_sites()
    return lm


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Quiet loading: TransformerLens 3.x warns on every HookedTransformer construction (the choice is
    deliberate, see above) and transformers draws a bar per weights file."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; a load is one step to our users
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load_local(path: Path, dev: torch.device, *, spec: str, processing: dict[str, bool]) -> LoadedModel:
    hf_cfg = _check_local_dir(path)
    cfg_file = path / "config.json"

    import transformer_lens.loading_from_pretrained as tl_loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        from sae_lens import HookedSAETransformer

        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise InputError(f"{str(path)!r} has no usable tokenizer ({_first_line(exc)}); save one with "
                             "tokenizer.save_pretrained into the model directory") from None
        try:
            hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"transformers cannot load {str(path)!r} as a causal LM: {_first_line(exc)}") from None
        hf.eval()
        fold_ln = bool(processing.get("fold_ln"))
        try:
            cfg = _tl_config(path, hf_cfg, dev, fold_ln=fold_ln)
        except NotImplementedError as exc:
            arch = (hf_cfg.get("architectures") or ["?"])[0]
            raise InputError(f"architecture {arch} in {str(path)!r} is not supported by TransformerLens "
                             f"({_first_line(exc)}); use a GPT-2, GPT-NeoX/Pythia or Llama-family model") from None
        state = tl_loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf)
        model = HookedSAETransformer(cfg, tokenizer=tok, move_to_device=False)
        # the same flags and order as HookedTransformer.from_pretrained(_no_processing)(name, **processing)
        model.load_and_process_state_dict(state, fold_ln=fold_ln,
                                          center_writing_weights=bool(processing.get("center_writing_weights")),
                                          center_unembed=bool(processing.get("center_unembed")),
                                          fold_value_biases=bool(processing.get("fold_value_biases")),
                                          refactor_factored_attn_matrices=bool(
                                              processing.get("refactor_factored_attn_matrices")))
    model.to(dev, print_details=False)
    model.eval()
    del hf
    digest = hashlib.sha256(str(path.resolve()).encode() + cfg_file.read_bytes()).hexdigest()[:12]
    return LoadedModel(spec=spec, model_id=f"{path.name}-{digest}", model=model, tokenizer=tok, device=dev,
                       source_dir=path.resolve())


def _tl_config(path: Path, hf_cfg: dict[str, Any], dev: torch.device, *, fold_ln: bool = False) -> Any:
    """TransformerLens' config for a local directory.

    TL's GPT-2 converter reads ``n_ctx``, which configs saved by transformers 5 no longer carry (the value lives in
    ``n_positions``). TL reads only ``config.json`` here, so a patched copy of that one file in a scratch
    directory is enough; the weights are converted from the already loaded transformers model. ``fold_ln``
    switches the config to TL's LNPre normalisation, as ``from_pretrained(fold_ln=True)`` does.
    """
    import tempfile

    import transformer_lens.loading_from_pretrained as tl_loading

    if "n_ctx" in hf_cfg or "n_positions" not in hf_cfg:
        return tl_loading.get_pretrained_model_config(str(path), device=str(dev), fold_ln=fold_ln)
    with tempfile.TemporaryDirectory(prefix="autoexplain-cfg-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({**hf_cfg, "n_ctx": hf_cfg["n_positions"]}))
        cfg = tl_loading.get_pretrained_model_config(tmp, device=str(dev), fold_ln=fold_ln)
    cfg.model_name = cfg.tokenizer_name = str(path)
    return cfg


def hub_unreachable() -> str | None:
    """Why the hub cannot be used right now, else None: offline mode, its host does not resolve, or (without a
    proxy configured) a TCP connection to it does not open within 3 s. The network probe runs once per process
    and host.

    Checked before fetching anything that is not cached, so an offline user gets the error at once instead of
    after minutes of retries.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                               "ALL_PROXY", "all_proxy"))
    return _probe(host, port, bool(proxied))


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int, proxied: bool) -> str | None:
    """Why ``host:port`` cannot be used (does not resolve; no TCP connection within 3 s unless a proxy is set),
    else None. Cached per process: a run asks once, not per file."""
    import socket

    try:
        socket.getaddrinfo(host, port)
    except OSError:
        return f"{host} does not resolve"
    if not proxied:
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as exc:
            return f"{host} cannot be reached: {exc.__class__.__name__}"
    return None


def _load_hub(name: str, dev: torch.device, *, processing: dict[str, bool]) -> LoadedModel:
    """Load a hub name as sae-lens does for training: ``from_pretrained_no_processing(name, **processing)``, from
    the cache with the hub switched off when the snapshot is cached (see module doc)."""
    repo = hub_repo(name)
    cached = cached_model_snapshot(repo) is not None
    if not cached:
        why = hub_unreachable()
        if why:
            raise InputError(f"model {name!r} (hub repo {repo}) is not cached in {hf_cache_dir()} and the Hugging "
                             f"Face hub is unavailable ({why}): download it where the hub is reachable "
                             f"(hf download {repo}) or pass a local directory saved with save_pretrained")
    # TransformerLens prints "Loaded pretrained model …" to stdout; keep stdout for the CLI's own output
    with _quiet(), (hub_offline() if cached else contextlib.nullcontext()), contextlib.redirect_stdout(sys.stderr):
        from sae_lens import HookedSAETransformer

        try:
            model = HookedSAETransformer.from_pretrained_no_processing(name, device=str(dev), **processing)
        except ValueError as exc:
            if "not found" in str(exc).lower():
                raise InputError(f"{name!r} is neither an existing local directory nor a model name "
                                 "TransformerLens knows: pass a directory saved with save_pretrained, "
                                 "a name such as gpt2 or EleutherAI/pythia-70m, or toy:tiny") from None
            raise
        except OSError as exc:
            where = f"the cache {hf_cache_dir()}" if cached else "the Hugging Face hub"
            raise InputError(f"could not load {name!r} from {where} ({_first_line(exc)[:160]}): download it where "
                             f"a hub is reachable (hf download {repo}) and pass its local directory") from None
    model.eval()
    return LoadedModel(spec=name, model_id=name, model=model, tokenizer=model.tokenizer, device=dev)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__

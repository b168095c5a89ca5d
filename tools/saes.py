"""Load sae-lens SAEs and check them against the model they will be spliced into.

Specs
-----
* a directory written by sae-lens (``cfg.json`` + ``sae_weights.safetensors``): any architecture sae-lens
  knows (standard, TopK, JumpReLU, gated …); ``SAE.load_from_disk`` dispatches on the saved config;
* ``toy:MODEL/NAME``: an SAE of the toy zoo, e.g. ``toy:small/res0``, resolved to its directory by
  :func:`autoexplain.tools.loading.load_sae` (this module does not know the zoo);
* ``RELEASE/SAE_ID``: a sae-lens pretrained release (``gpt2-small-res-jb/blocks.8.hook_resid_pre``), resolved
  through sae-lens' directory (``pretrained_saes.yaml``: repo, folder, ``config_overrides``) and loaded from the
  local Hugging Face cache with the hub switched off when its files are cached (online or offline, no network
  wait), else fetched where the hub is reachable; neither cached nor reachable is refused naming the cache
  directory and why the hub is unavailable.

Training settings
-----------------
An SAE only means something on the activations it was trained on. sae-lens records how those were produced, in a
release's ``config_overrides`` or in ``cfg.json`` (top level in pre-6.0 configs, under ``metadata`` since 6.0; a
release override wins), and each is honoured or refused by name:

* ``model_from_pretrained_kwargs``: TransformerLens weight processing (``center_writing_weights``, ``fold_ln`` …,
  see :data:`autoexplain.tools.models.PROCESSING_FLAGS`). :func:`model_settings` reads them without loading
  weights so the model can be loaded with them (:func:`autoexplain.tools.loading.load_model` with ``sae_specs``);
  :func:`load_sae` refuses an SAE whose model was loaded with other settings, naming the setting. Keys that only
  place or type the model (``n_devices``, ``device``, ``dtype`` …) do not change what the SAE reads beyond
  precision and are ignored; any other key is refused.
* ``normalize_activations``: ``constant_norm_rescale`` and ``layer_norm`` are applied by sae-lens' own ``encode``;
  ``expected_average_only_in`` is honoured only when sae-lens folded the release's ``norm_scaling_factor`` into the
  weights at load (otherwise sae-lens silently skips the scaling), and ``covariance_whitening`` only once folded;
  else refused.
* ``hook_head_index`` (an SAE on one head's slice of a hook): refused, since autoexplain's sites splice and read
  whole hooks.
* ``prepend_bos``, ``context_size``, ``seqpos_slice``: what windows the SAE saw. They are exposed on
  :class:`LoadedSAE`; :func:`check_window` refuses harvest settings that contradict them.

Checks on load (sae-lens itself silently skips an SAE whose hook is missing and never compares widths):
the SAE names a hook, the hook is a site of this model, it fires, and the activation there has width ``d_in``.
The weights themselves are checked too: every parameter finite (no NaN or Inf: an all-NaN SAE would otherwise
load and report every feature dead) and the encoder and decoder shaped ``[d_in, d_sae]`` / ``[d_sae, d_in]`` as the
config says; a corrupt or truncated weights file is refused rather than raising from deep inside safetensors.
Each failure is one :class:`InputError` line.

Transcoders
-----------
A sae-lens transcoder (architectures ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
``jumprelu_skip_transcoder``) encodes the activation at its input hook (``metadata.hook_name``) and decodes to the
activation at an output hook (``metadata.hook_name_out``), typically MLP input -> MLP output: it replaces a
computation rather than reconstructing an activation. It loads as a :class:`LoadedTranscoder` (a
:class:`LoadedSAE` whose ``site`` is the input site, plus ``site_out``), with the same checks at both ends: each hook
is a site of this model, fires, and has the width the config says (``d_in`` at the input, ``d_out`` at the output),
and the output site comes after the input site in the forward pass. A transcoder without ``hook_name_out`` or with
``hook_head_index_out`` is refused. Everything that reads features (harvests, labels) reads them at the input site,
as for an SAE; splicing it (attribution, feature circuits) writes at the output site.

The ``sae_id`` is a content hash of the config and weights, so the same SAE gets the same id wherever its files
live.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autoexplain.tools.errors import InputError
from autoexplain.tools.models import (
    PROCESSING_FLAGS,
    TOY_PREFIX,
    LoadedModel,
    _quiet,
    cached_snapshot,
    hf_cache_dir,
    hub_offline,
    hub_unreachable,
    normalize_processing,
    site_from_hook_name,
)
from autoexplain.tools.vocab import Site, SiteKind

if TYPE_CHECKING:
    from sae_lens import SAE

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"

#: ``model_from_pretrained_kwargs`` keys that place or type the model but do not change what an SAE reads (beyond
#: numeric precision): ignored. Any key neither here nor in PROCESSING_FLAGS is refused.
IGNORED_MODEL_KWARGS = frozenset({"n_devices", "device", "device_map", "move_to_device", "dtype", "torch_dtype",
                                  "trust_remote_code", "low_cpu_mem_usage"})
#: sae-lens architectures whose decoder writes another hook than their encoder reads (loaded as
#: :class:`LoadedTranscoder`; for code that sees only a stored architecture name)
TRANSCODER_ARCHITECTURES = frozenset({"transcoder", "skip_transcoder", "jumprelu_transcoder",
                                      "jumprelu_skip_transcoder"})
#: Forward order of layer-level site kinds inside one block (a transcoder's output must come after its input).
FORWARD_ORDER = {SiteKind.RESID_PRE: 0, SiteKind.ATTN_OUT: 1, SiteKind.RESID_MID: 2, SiteKind.MLP_IN: 3,
                 SiteKind.MLP_POST: 4, SiteKind.MLP_OUT: 5, SiteKind.RESID_POST: 6}


@dataclass
class LoadedSAE:
    spec: str
    sae_id: str
    sae: SAE[Any]
    site: Site
    hook_name: str
    source_dir: Path | None = None
    #: processing flags the model must be loaded with (``{}``: none), see :func:`model_settings`
    model_settings: dict[str, bool] = field(default_factory=dict)
    #: whether training windows started with BOS (None: the config does not say)
    prepend_bos: bool | None = None
    #: training window length in tokens, BOS included (None: unknown)
    context_size: int | None = None
    #: the positions training used (sae-lens ``seqpos_slice``; None: all)
    seqpos_slice: tuple[int | None, ...] | None = None

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())

    @property
    def is_transcoder(self) -> bool:
        """Whether the decoder writes another site than the encoder reads (see :class:`LoadedTranscoder`)."""
        return False

    @property
    def out_site(self) -> Site:
        """The site the decoder reconstructs: the SAE's own site (a transcoder's output site)."""
        return self.site

    @property
    def out_hook(self) -> str:
        return self.hook_name

    @property
    def d_out(self) -> int:
        """Width of the decoder's output: ``d_in`` for an SAE."""
        return self.d_in

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "sae_id": self.sae_id, "site": str(self.site), "hook_name": self.hook_name,
                "d_in": self.d_in, "d_sae": self.d_sae, "architecture": self.architecture,
                "model_settings": sorted(self.model_settings), "prepend_bos": self.prepend_bos,
                "context_size": self.context_size}


@dataclass(kw_only=True)
class LoadedTranscoder(LoadedSAE):
    """A sae-lens transcoder: features encoded from the activation at ``site`` (``hook_name``), decoded into the
    activation at ``site_out`` (``hook_name_out``). A skip transcoder's skip connection (a linear map of the input)
    is not a feature: spliced, its contribution counts in the error term."""

    site_out: Site
    hook_name_out: str

    @property
    def is_transcoder(self) -> bool:
        return True

    @property
    def out_site(self) -> Site:
        return self.site_out

    @property
    def out_hook(self) -> str:
        return self.hook_name_out

    @property
    def d_out(self) -> int:
        return int(self.sae.cfg.d_out)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "site_out": str(self.site_out), "hook_name_out": self.hook_name_out,
                "d_out": self.d_out}


def check_sae_spec(spec: str) -> None:
    """Refuse an SAE spec that cannot load, without loading any weights (one :class:`InputError` line): a missing
    path, a directory without cfg.json or weights, an unknown release or SAE id, a release neither cached nor
    reachable, and training settings autoexplain cannot honour (see module doc)."""
    spec = spec.strip()
    if not spec:
        raise InputError("empty SAE spec: pass an sae-lens directory, toy:MODEL/NAME or RELEASE/SAE_ID")
    model_settings(spec)


def model_settings(spec: str) -> dict[str, bool]:
    """The TransformerLens processing flags the SAE ``spec`` (a directory or RELEASE/SAE_ID, not ``toy:``) was
    trained on, e.g. ``{"center_writing_weights": True}`` (``{}``: unprocessed), read from its cfg.json and release
    overrides without loading weights (a release's cfg.json from the cache, else fetched alone). Settings that
    cannot be honoured are refused here, so this is also the cheap check of an SAE spec."""
    cfg, _ = _sae_config(spec.strip())
    return _settings_of(cfg, spec.strip())


def _sae_config(spec: str) -> tuple[dict[str, Any], Path | None]:
    """The sae-lens config dict of ``spec`` (normalised like sae-lens does) and its directory, without weights."""
    path = Path(spec).expanduser()
    if path.exists():
        return _dir_config(path, spec), path
    release, sae_id = _release_entry(spec)
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    with _release_source(spec, release, sae_id), _quiet():
        try:
            return load_sae_config_from_huggingface(release, sae_id, device="cpu"), None
        except OSError as exc:
            raise InputError(f"could not read the config of SAE {spec!r} ({type(exc).__name__}: "
                             f"{_first_line(exc)}): download the release where the hub is reachable") from None


def _dir_config(path: Path, spec: str) -> dict[str, Any]:
    _check_dir(path)
    try:
        raw = json.loads((path / CFG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(path / CFG_FILE)!r} is not valid JSON ({type(exc).__name__}): re-save the SAE "
                         "with sae.save_model") from None
    if not isinstance(raw, dict):
        raise InputError(f"{str(path / CFG_FILE)!r} is not an sae-lens config (a JSON object)")
    return _defaulted(raw, spec)


def _defaulted(raw: dict[str, Any], spec: str) -> dict[str, Any]:
    """sae-lens' own normalisation of a config (pre-6.0 keys renamed, metadata gathered); release overrides and
    pre-6.0 metadata stay readable at the top level too (see :func:`_meta`)."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    try:
        return {**raw, **handle_config_defaulting(dict(raw))}
    except Exception as exc:  # an unknown architecture or malformed field raises whatever its parser raises
        raise InputError(f"SAE {spec!r}: sae-lens cannot read its cfg.json ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None


def _meta(cfg: dict[str, Any], key: str) -> Any:
    """A metadata value: a top-level key (a release's ``config_overrides``, pre-6.0 configs) wins over the 6.0
    ``metadata`` block, as the override is meant to correct the file."""
    if key in cfg:
        return cfg[key]
    meta = cfg.get("metadata")
    return meta.get(key) if isinstance(meta, dict) else None


def _settings_of(cfg: dict[str, Any], spec: str) -> dict[str, bool]:
    kwargs = _meta(cfg, "model_from_pretrained_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InputError(f"SAE {spec!r}: model_from_pretrained_kwargs is {kwargs!r}, not a mapping")
    unknown = sorted(k for k in kwargs if k not in PROCESSING_FLAGS and k not in IGNORED_MODEL_KWARGS)
    if unknown:
        raise InputError(f"SAE {spec!r} asks for model_from_pretrained_kwargs {unknown[0]}={kwargs[unknown[0]]!r}, "
                         "which autoexplain cannot honour (it applies only "
                         f"{', '.join(PROCESSING_FLAGS)}): its activations would differ from its training")
    if _meta(cfg, "hook_head_index") is not None:
        raise InputError(f"SAE {spec!r} reads one head (hook_head_index {_meta(cfg, 'hook_head_index')}) of its "
                         "hook, which autoexplain cannot honour: its sites splice and read whole hooks")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in",
                    "covariance_whitening"):
        raise InputError(f"SAE {spec!r}: normalize_activations {norm!r} is not one sae-lens knows")
    return normalize_processing({k: v for k, v in kwargs.items() if k in PROCESSING_FLAGS})


def _check_dir(path: Path) -> None:
    if not path.is_dir() or not (path / CFG_FILE).is_file():
        raise InputError(f"{str(path)!r} is not an sae-lens SAE directory: it needs cfg.json and {WEIGHTS_FILE} "
                         "(as written by sae.save_model)")
    if not (path / WEIGHTS_FILE).is_file():
        raise InputError(f"{str(path)!r} has cfg.json but no {WEIGHTS_FILE}: re-save the SAE with sae.save_model")


def _release_entry(spec: str) -> tuple[str, str]:
    """``(release, sae_id)`` of a sae-lens release spec, refused unless sae-lens' directory lists it."""
    release, _, sae_id = spec.partition("/")
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if not sae_id or release not in directory:
        raise InputError(f"SAE {spec!r} is neither an existing directory nor RELEASE/SAE_ID of a sae-lens release "
                         "(e.g. gpt2-small-res-jb/blocks.8.hook_resid_pre); pass a local sae-lens directory")
    if sae_id not in directory[release].saes_map:
        some = ", ".join(list(directory[release].saes_map)[:3])
        raise InputError(f"release {release!r} has no SAE {sae_id!r}: its ids look like {some}")
    return release, sae_id


def release_cached(release: str, sae_id: str) -> bool:
    """Whether a release SAE's files are in the local hub cache. For releases in sae-lens' own format (no
    ``conversion_func``) that is ``FOLDER/cfg.json`` and ``FOLDER/sae_weights.safetensors`` via
    ``try_to_load_from_cache``; other formats name their files in their converters, so there the repo's cached
    snapshot must exist (weaker: a partial snapshot counts, and the load then reports the missing file)."""
    from huggingface_hub import try_to_load_from_cache
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory, get_repo_id_and_folder_name

    entry = get_pretrained_saes_directory()[release]
    repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    if entry.conversion_func is None:
        prefix = f"{folder}/" if folder else ""
        return all(isinstance(try_to_load_from_cache(repo_id, prefix + name), str) for name in (CFG_FILE, WEIGHTS_FILE))
    return cached_snapshot(repo_id) is not None


@contextlib.contextmanager
def _release_source(spec: str, release: str, sae_id: str) -> Iterator[None]:
    """Read the release from the cache with the hub off when it is cached; else let it fetch if the hub is
    reachable; else refuse in one line."""
    if release_cached(release, sae_id):
        with hub_offline():
            yield
        return
    why = hub_unreachable()
    if why:
        from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

        repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
        raise InputError(f"SAE {spec!r} (hub repo {repo_id}, folder {folder}) is not cached in {hf_cache_dir()} and "
                         f"the Hugging Face hub is unavailable ({why}): download it where the hub is reachable "
                         "or pass a local sae-lens directory")
    yield


def load_sae(spec: str, lm: LoadedModel) -> LoadedSAE:
    """Load the SAE ``spec`` (a directory or RELEASE/SAE_ID) onto the model's device and check that it fits ``lm``
    (see module doc), including that ``lm`` was loaded with the processing the SAE was trained on.
    ``toy:MODEL/NAME`` specs are loaded by :func:`autoexplain.tools.loading.load_sae`."""
    spec = spec.strip()
    if not spec:
        raise InputError("empty SAE spec: pass an sae-lens directory, toy:MODEL/NAME or RELEASE/SAE_ID")
    if spec.startswith(TOY_PREFIX):
        raise InputError(f"{spec!r} is a toy-zoo spec: load it with autoexplain.tools.loading.load_sae")
    if Path(spec).expanduser().exists():
        return load_sae_dir(Path(spec).expanduser(), lm, spec=spec)
    loaded = _from_release(spec, lm)
    _check_fits(loaded, lm)
    return loaded


def load_sae_dir(path: Path, lm: LoadedModel, *, spec: str | None = None) -> LoadedSAE:
    """Load the sae-lens directory ``path`` (recorded as ``spec``, default the path) and check that it fits
    ``lm``."""
    loaded = _from_dir(path, lm, str(path) if spec is None else spec)
    _check_fits(loaded, lm)
    return loaded


@contextlib.contextmanager
def _sae_quiet() -> Iterator[None]:
    """sae-lens warns on constructing an SAE with model_from_pretrained_kwargs; autoexplain applies them itself."""
    with _quiet(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs",
                                category=UserWarning)
        yield


def _from_dir(path: Path, lm: LoadedModel, spec: str) -> LoadedSAE:
    cfg = _dir_config(path, spec)
    settings = _settings_of(cfg, spec)
    weights = path / WEIGHTS_FILE
    from sae_lens import SAE

    with _sae_quiet():
        try:
            sae = SAE.load_from_disk(str(path), device=str(lm.device))
        except Exception as exc:  # a corrupt or truncated file raises whatever its parser raises
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise InputError(f"sae-lens cannot load {str(path)!r} (is {WEIGHTS_FILE} complete and cfg.json valid? "
                             f"{type(exc).__name__}: {first})") from None
    # weights alone are not identity: a TopK and a ReLU SAE can share weights and still fire differently
    digest = hashlib.sha256(json.dumps(json.loads((path / CFG_FILE).read_text()), sort_keys=True).encode())
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return _wrap(sae, spec, f"sae-{digest.hexdigest()[:16]}", path.resolve(), cfg, settings)


def _from_release(spec: str, lm: LoadedModel) -> LoadedSAE:
    release, sae_id = _release_entry(spec)
    from sae_lens import SAE

    with _release_source(spec, release, sae_id), _sae_quiet():
        try:
            sae, cfg, _ = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id, device=str(lm.device))
        except OSError as exc:
            raise InputError(f"could not load SAE {spec!r} ({type(exc).__name__}: {_first_line(exc)[:120]}): "
                             "download it where the hub is reachable or pass a local sae-lens directory") from None
    return _wrap(sae, spec, f"{release}/{sae_id}", None, cfg, _settings_of(cfg, spec))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _wrap(sae: Any, spec: str, sae_id: str, source: Path | None, cfg: dict[str, Any],
          settings: dict[str, bool]) -> LoadedSAE:
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    if not hook:
        raise InputError(f"SAE {spec!r} names no hook (cfg.json metadata.hook_name is empty), so sae-lens would "
                         "silently skip it: set hook_name, e.g. blocks.0.hook_resid_post")
    try:
        site = site_from_hook_name(hook)
    except InputError as exc:
        raise InputError(f"SAE {spec!r}: {exc}") from None
    norm = str(sae.cfg.normalize_activations)
    if norm in ("expected_average_only_in", "covariance_whitening"):
        how = ("the release lists no norm_scaling_factor to fold into the weights" if norm.startswith("expected")
               else "the whitening statistics are not folded into the weights")
        raise InputError(f"SAE {spec!r} expects normalize_activations {norm!r}, which autoexplain cannot honour "
                         f"({how}; sae-lens would silently feed it unnormalised activations): fold the "
                         "normalisation into the weights and re-save the SAE")
    sae.eval()
    check_weights(sae, spec)
    prepend_bos, context_size = _meta(cfg, "prepend_bos"), _meta(cfg, "context_size")
    seqpos = _meta(cfg, "seqpos_slice")
    common: dict[str, Any] = dict(
        spec=spec, sae_id=sae_id, sae=sae, site=site, hook_name=hook, source_dir=source, model_settings=settings,
        prepend_bos=None if prepend_bos is None else bool(prepend_bos),
        context_size=None if context_size is None else int(context_size),
        seqpos_slice=None if seqpos is None else tuple(seqpos))
    if not _is_transcoder(sae):
        return LoadedSAE(**common)
    hook_out = getattr(sae.cfg.metadata, "hook_name_out", None)
    if not hook_out:
        raise InputError(f"transcoder {spec!r} names no output hook (cfg.json metadata.hook_name_out is empty): "
                         "set it to the hook its decoder reconstructs, e.g. blocks.0.hook_mlp_out")
    if getattr(sae.cfg.metadata, "hook_head_index_out", None) is not None:
        raise InputError(f"transcoder {spec!r} writes one head (hook_head_index_out) of {hook_out}, which "
                         "autoexplain cannot honour: its sites splice whole hooks")
    try:
        site_out = site_from_hook_name(str(hook_out))
    except InputError as exc:
        raise InputError(f"transcoder {spec!r} output: {exc}") from None
    if site.kind not in FORWARD_ORDER or site_out.kind not in FORWARD_ORDER or (
            (site_out.layer, FORWARD_ORDER[site_out.kind]) <= (site.layer, FORWARD_ORDER[site.kind])):
        raise InputError(f"transcoder {spec!r} reads {hook} and writes {hook_out}: its output must be a residual, "
                         "attention-output or MLP site after its input in the forward pass")
    return LoadedTranscoder(**common, site_out=site_out, hook_name_out=str(hook_out))


def _is_transcoder(sae: Any) -> bool:
    from sae_lens.saes.transcoder import Transcoder

    return isinstance(sae, Transcoder)


def check_window(sae: LoadedSAE, ctx: int) -> None:
    """Refuse harvest windows that contradict how ``sae`` was trained (one :class:`InputError` line).

    The harvest always starts a window with BOS and reads every position of windows of ``ctx`` tokens, BOS
    included (sae-lens' ``context_size`` counts BOS too). Refused: an SAE trained without BOS
    (``prepend_bos`` false: position 0 and the attention sink it creates would be outside its training);
    ``ctx`` longer than its ``context_size`` (later positions were never seen in training, and SAEs are known to
    misbehave past their training context); a ``seqpos_slice`` that trained on part of the positions only.
    Shorter windows are fine: every position of them was seen. Unknown settings (None) are not refused.
    """
    if sae.prepend_bos is False:
        raise InputError(f"SAE {sae.spec!r} was trained without a BOS token (prepend_bos false), but the harvest "
                         "starts every window with BOS: its activations there would not be the ones it was trained "
                         "on; use an SAE trained with BOS")
    if sae.context_size is not None and ctx > sae.context_size:
        raise InputError(f"ctx {ctx} exceeds SAE {sae.spec!r}'s training context_size of {sae.context_size} tokens: "
                         f"positions past it were never seen in training; pass --ctx {sae.context_size} or less")
    if sae.seqpos_slice is not None and tuple(sae.seqpos_slice) not in ((), (None,), (None, None), (0, None)):
        raise InputError(f"SAE {sae.spec!r} was trained on positions seqpos_slice {list(sae.seqpos_slice)} only, but "
                         "the harvest reads every position of its windows: autoexplain cannot honour seqpos_slice")


def check_model_settings(sae: LoadedSAE, lm: LoadedModel) -> None:
    """Refuse ``sae`` on ``lm`` unless ``lm`` was loaded with exactly the processing flags ``sae`` was trained on;
    the message names the first flag that differs."""
    have, want = normalize_processing(lm.processing), normalize_processing(sae.model_settings)
    for flag in PROCESSING_FLAGS:
        if want.get(flag) and not have.get(flag):
            raise InputError(f"SAE {sae.spec!r} was trained on the model loaded with {flag}=True (sae-lens "
                             f"model_from_pretrained_kwargs), but model {lm.model_id} was loaded without it: its "
                             "activations would differ; load the model with this SAE among its sae_specs")
        if have.get(flag) and not want.get(flag):
            raise InputError(f"model {lm.model_id} was loaded with {flag}=True, which SAE {sae.spec!r} was not "
                             "trained on: its activations would differ; load the model with only SAEs that agree "
                             "on their model settings")


def check_weights(sae: Any, spec: str) -> None:
    """Every parameter of ``sae`` is finite, and ``W_enc``/``W_dec``/``b_enc``/``b_dec`` (a skip transcoder's
    ``W_skip``) have the shapes its config (``d_in``, ``d_sae``; a transcoder's ``d_out``) says; else one
    :class:`InputError` line."""
    d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    d_out = int(getattr(sae.cfg, "d_out", d_in))  # only transcoder configs have d_out
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
                "W_skip": (d_out, d_in)}
    with torch.no_grad():
        for name, param in sae.named_parameters():
            want = expected.get(name)
            if want is not None and tuple(param.shape) != want:
                out = f", d_out {d_out}" if hasattr(sae.cfg, "d_out") else ""
                raise InputError(f"SAE {spec!r}: {name} has shape {list(param.shape)} but cfg.json says d_in {d_in}, "
                                 f"d_sae {d_sae}{out} (expected {list(want)}): the weights do not match the config")
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                bad = int((~torch.isfinite(param)).sum())
                raise InputError(f"SAE {spec!r}: {name} holds {bad:,} NaN or infinite values of {param.numel():,}: "
                                 "the weights are broken (a diverged training run?); retrain or re-export the SAE")


def _check_fits(loaded: LoadedSAE, lm: LoadedModel) -> None:
    """``lm`` has the SAE's processing settings, the SAE's site exists in ``lm``, its hook fires, and the
    activation width there equals ``d_in`` (a transcoder: the same at its output site, width ``d_out``)."""
    check_model_settings(loaded, lm)
    try:
        lm.validate_site(loaded.site)
    except InputError as exc:
        raise InputError(f"SAE {loaded.spec!r} reads hook {loaded.hook_name}, which this model lacks: {exc}") from None
    if loaded.is_transcoder:
        try:
            lm.validate_site(loaded.out_site)
        except InputError as exc:
            raise InputError(f"transcoder {loaded.spec!r} writes hook {loaded.out_hook}, which this model lacks: "
                             f"{exc}") from None
    shapes: dict[str, list[int]] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        shapes[hook.name] = list(act.shape)

    probe = torch.arange(1, 3, device=lm.device)[None, :]
    hooks = list(dict.fromkeys([loaded.hook_name, loaded.out_hook]))
    last = max(loaded.site.layer, loaded.out_site.layer) + 1
    with torch.no_grad(), lm.sites_enabled([loaded.site, loaded.out_site]):  # one pass: the hooks fire, widths
        lm.model.run_with_hooks(probe, fwd_hooks=[(h, grab) for h in hooks], stop_at_layer=last)
    if loaded.hook_name not in shapes:
        raise InputError(f"SAE {loaded.spec!r} reads hook {loaded.hook_name}, which exists in this model but never "
                         "fires: this runtime cannot feed the SAE; use an SAE trained on another site")
    if loaded.is_transcoder:
        out_shape = shapes.get(loaded.out_hook)
        if out_shape is None:
            raise InputError(f"transcoder {loaded.spec!r} writes hook {loaded.out_hook}, which exists in this model "
                             "but never fires: its output cannot be spliced; use a transcoder of another site")
        if out_shape[-1] != loaded.d_out:
            raise InputError(f"transcoder {loaded.spec!r} has d_out {loaded.d_out} but the model's activation at "
                             f"{loaded.out_site} ({loaded.out_hook}) has width {out_shape[-1]}: the transcoder was "
                             "trained on another model or site")
    shape = shapes[loaded.hook_name]
    width = shape[-1]
    if getattr(loaded.sae.cfg, "reshape_activations", "none") == "hook_z":
        width = shape[-1] * shape[-2]  # sae-lens flattens [.., head, d_head] for hook_z SAEs
    if width != loaded.d_in:
        raise InputError(f"SAE {loaded.spec!r} has d_in {loaded.d_in} but the model's activation at "
                         f"{loaded.site} ({loaded.hook_name}) has width {width}: the SAE was trained on another "
                         "model or site")


def feature_activations(lm: LoadedModel, sae: LoadedSAE, tokens: torch.Tensor) -> torch.Tensor:
    """SAE feature activations ``[batch, pos, d_sae]`` on ``tokens``, running the model only up to the SAE's layer.

    Reads the activation at the SAE's hook and encodes it with sae-lens' own ``encode`` (which applies the
    architecture's activation function, thresholds and any reshaping). Association-level evidence only.
    """
    acts: list[torch.Tensor] = []

    def grab(act: torch.Tensor, hook: Any) -> None:
        acts.append(act)

    with torch.no_grad():
        lm.model.run_with_hooks(tokens.to(lm.device), fwd_hooks=[(sae.hook_name, grab)],
                                stop_at_layer=sae.site.layer + 1)
        if len(acts) != 1:
            raise RuntimeError(f"hook {sae.hook_name} fired {len(acts)} times, expected once")
        return sae.sae.encode(acts[0])


#: sae-lens classes whose ``encode`` treats every feature on its own — a feature's activation depends only on the
#: input and that feature's encoder column, biases and threshold (input processing: cast, ``hook_z`` reshape,
#: per-token normalisation, ``b_dec`` subtraction, is the same for all features) — with, for each, the tensors the
#: encoder reads per feature and the dimension that indexes features. TopK-style and other architectures whose
#: features compete within a token are absent on purpose.
_FEATURE_WISE_ENCODERS: dict[str, dict[str, int]] = {
    "StandardSAE": {"W_enc": 1, "b_enc": 0},
    "JumpReLUSAE": {"W_enc": 1, "b_enc": 0, "threshold": 0},
    "GatedSAE": {"W_enc": 1, "b_gate": 0, "b_mag": 0, "r_mag": 0},
}


class _Encode(torch.nn.Module):
    """``forward`` = the wrapped SAE's ``encode`` (what :func:`torch.func.functional_call` can call)."""

    def __init__(self, sae: SAE[Any]) -> None:
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)


class FeatureSliceEncoder:
    """sae-lens' own ``encode`` run on a contiguous range of features: ``enc(x, lo, hi)`` equals
    ``sae.encode(x)[..., lo:hi]`` (bit for bit on the CPU: each output column of the matrix product is computed as
    in the full product; checked in the tests) without computing or storing the other features.

    Why: a harvest must see every feature of every token, but holding ``[tokens, d_sae]`` at once costs 0.8 GB per
    2,048 tokens at 98,304 features, and cutting the *tokens* into small sub-batches makes the encoder's matrix
    product re-read the whole 300 MB encoder matrix per sub-batch (about 1.7x the time of one product at GPT-2-small
    shape and 170-row sub-batches). Cutting the *features* instead reads each encoder column once per batch and keeps
    each output block small.

    How: :func:`torch.func.functional_call` runs the SAE's ``encode`` with its per-feature tensors replaced by
    slices (views, no copy), so the architecture's own code (activation, threshold, gating, normalisation) runs
    unchanged. Only for the classes in :data:`_FEATURE_WISE_ENCODERS`, and only when no other tensor of the module
    but the decoder has a ``d_sae``-sized dimension (a sae-lens version that adds one is not sliced: :meth:`of`
    returns None and callers encode whole tokens). Caveat: during a call the module's encoder attributes *are* the
    slices — do not read them from another thread meanwhile (a harvest reads only the decoder concurrently)."""

    def __init__(self, sae: SAE[Any], dims: dict[str, int]) -> None:
        self._call = _Encode(sae)
        self._dims = dims

    @classmethod
    def of(cls, loaded: LoadedSAE) -> FeatureSliceEncoder | None:
        """The slicing encoder for ``loaded``, or None where its architecture's features are not independent."""
        import sae_lens

        module = loaded.sae
        name = type(module).__name__
        dims = _FEATURE_WISE_ENCODERS.get(name)
        if dims is None or type(module) is not getattr(sae_lens, name, None) or loaded.is_transcoder:
            return None
        d_sae = loaded.d_sae
        named = dict(module.named_parameters()) | dict(module.named_buffers())
        for key, tensor in named.items():
            sliced = dims.get(key)
            if sliced is not None:
                if tensor.ndim <= sliced or tensor.shape[sliced] != d_sae:
                    return None
            elif key != "W_dec" and d_sae in tensor.shape:
                return None  # a per-feature tensor this table does not know: encode whole tokens
        if any(key not in named for key in dims):
            return None
        return cls(module, dims)

    def __call__(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``encode(x)`` for features ``lo .. hi-1``: shape ``[*x.shape[:-1], hi - lo]``."""
        sae = self._call.sae
        params = {f"sae.{name}": getattr(sae, name).narrow(dim, lo, hi - lo) for name, dim in self._dims.items()}
        return torch.func.functional_call(self._call, params, (x,))

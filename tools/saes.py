"""Load sae-lens SAEs and check them against the model they will be spliced into.

Specs
-----
* a directory written by sae-lens (``cfg.json`` + ``sae_weights.safetensors``): any architecture sae-lens
  knows (standard, TopK, JumpReLU, gated …); ``SAE.load_from_disk`` dispatches on the saved config;
* ``toy:MODEL/NAME``: an SAE of the toy zoo, e.g. ``toy:small/res0``, resolved to its directory by
  :func:`autoexplain.tools.loading.load_sae` (this module does not know the zoo);
* ``RELEASE/SAE_ID``: a sae-lens pretrained release (``gpt2-small-res-jb/blocks.8.hook_resid_pre``), fetched
  where a hub is reachable.

Checks on load (sae-lens itself silently skips an SAE whose hook is missing and never compares widths):
the SAE names a hook, the hook is a site of this model, it fires, and the activation there has width ``d_in``.
The weights themselves are checked too: every parameter finite (no NaN or Inf: an all-NaN SAE would otherwise
load and report every feature dead) and the encoder and decoder shaped ``[d_in, d_sae]`` / ``[d_sae, d_in]`` as the
config says; a corrupt or truncated weights file is refused rather than raising from deep inside safetensors.
Each failure is one :class:`InputError` line.

The ``sae_id`` is a content hash of the config and weights, so the same SAE gets the same id wherever its files
live.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autoexplain.tools.errors import InputError
from autoexplain.tools.models import TOY_PREFIX, LoadedModel, _hub_unreachable, _quiet, site_from_hook_name
from autoexplain.tools.vocab import Site

if TYPE_CHECKING:
    from sae_lens import SAE

WEIGHTS_FILE = "sae_weights.safetensors"


@dataclass
class LoadedSAE:
    spec: str
    sae_id: str
    sae: SAE[Any]
    site: Site
    hook_name: str
    source_dir: Path | None = None

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "sae_id": self.sae_id, "site": str(self.site), "hook_name": self.hook_name,
                "d_in": self.d_in, "d_sae": self.d_sae, "architecture": self.architecture}


def check_sae_spec(spec: str) -> None:
    """Refuse an SAE spec that cannot load, without loading any weights (one :class:`InputError` line)."""
    spec = spec.strip()
    if not spec:
        raise InputError("empty SAE spec: pass an sae-lens directory, toy:MODEL/NAME or RELEASE/SAE_ID")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "cfg.json").is_file():
            raise InputError(f"{str(path)!r} is not an sae-lens SAE directory: it needs cfg.json and "
                             f"{WEIGHTS_FILE} (as written by sae.save_model)")
        if not (path / WEIGHTS_FILE).is_file():
            raise InputError(f"{str(path)!r} has cfg.json but no {WEIGHTS_FILE}: re-save the SAE with "
                             "sae.save_model")
        return
    _release_entry(spec)


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


def load_sae(spec: str, lm: LoadedModel) -> LoadedSAE:
    """Load the SAE ``spec`` (a directory or RELEASE/SAE_ID) onto the model's device and check that it fits ``lm``
    (see module doc). ``toy:MODEL/NAME`` specs are loaded by :func:`autoexplain.tools.loading.load_sae`."""
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


def _from_dir(path: Path, lm: LoadedModel, spec: str) -> LoadedSAE:
    if not path.is_dir() or not (path / "cfg.json").is_file():
        raise InputError(f"{str(path)!r} is not an sae-lens SAE directory: it needs cfg.json and {WEIGHTS_FILE} "
                         "(as written by sae.save_model)")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(f"{str(path)!r} has cfg.json but no {WEIGHTS_FILE}: re-save the SAE with sae.save_model")
    from sae_lens import SAE

    with _quiet():
        try:
            sae = SAE.load_from_disk(str(path), device=str(lm.device))
        except Exception as exc:  # a corrupt or truncated file raises whatever its parser raises
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise InputError(f"sae-lens cannot load {str(path)!r} (is {WEIGHTS_FILE} complete and cfg.json valid? "
                             f"{type(exc).__name__}: {first})") from None
    # weights alone are not identity: a TopK and a ReLU SAE can share weights and still fire differently
    digest = hashlib.sha256(json.dumps(json.loads((path / "cfg.json").read_text()), sort_keys=True).encode())
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return _wrap(sae, spec, f"sae-{digest.hexdigest()[:16]}", path.resolve())


def _from_release(spec: str, lm: LoadedModel) -> LoadedSAE:
    release, sae_id = _release_entry(spec)
    why = _hub_unreachable()
    if why:
        raise InputError(f"SAE {spec!r} is a sae-lens release, but the Hugging Face hub is unavailable ({why}): "
                         "download it where a hub is reachable and pass its local directory")
    from sae_lens import SAE

    with _quiet():
        try:
            sae = SAE.from_pretrained(release, sae_id, device=str(lm.device))
        except OSError as exc:
            raise InputError(f"could not fetch SAE {spec!r} from the hub (offline? {str(exc).splitlines()[0][:80]}): "
                             "download it where a hub is reachable and pass its local directory") from None
    return _wrap(sae, spec, f"{release}/{sae_id}", None)


def _wrap(sae: Any, spec: str, sae_id: str, source: Path | None) -> LoadedSAE:
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    if not hook:
        raise InputError(f"SAE {spec!r} names no hook (cfg.json metadata.hook_name is empty), so sae-lens would "
                         "silently skip it: set hook_name, e.g. blocks.0.hook_resid_post")
    try:
        site = site_from_hook_name(hook)
    except InputError as exc:
        raise InputError(f"SAE {spec!r}: {exc}") from None
    sae.eval()
    check_weights(sae, spec)
    return LoadedSAE(spec=spec, sae_id=sae_id, sae=sae, site=site, hook_name=hook, source_dir=source)


def check_weights(sae: Any, spec: str) -> None:
    """Every parameter of ``sae`` is finite, and ``W_enc``/``W_dec``/``b_enc``/``b_dec`` have the shapes its config
    (``d_in``, ``d_sae``) says; else one :class:`InputError` line."""
    d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    with torch.no_grad():
        for name, param in sae.named_parameters():
            want = expected.get(name)
            if want is not None and tuple(param.shape) != want:
                raise InputError(f"SAE {spec!r}: {name} has shape {list(param.shape)} but cfg.json says d_in {d_in}, "
                                 f"d_sae {d_sae} (expected {list(want)}): the weights do not match the config")
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                bad = int((~torch.isfinite(param)).sum())
                raise InputError(f"SAE {spec!r}: {name} holds {bad:,} NaN or infinite values of {param.numel():,}: "
                                 "the weights are broken (a diverged training run?); retrain or re-export the SAE")


def _check_fits(loaded: LoadedSAE, lm: LoadedModel) -> None:
    """The SAE's site exists in ``lm``, its hook fires, and the activation width there equals ``d_in``."""
    try:
        lm.validate_site(loaded.site)
    except InputError as exc:
        raise InputError(f"SAE {loaded.spec!r} reads hook {loaded.hook_name}, which this model lacks: {exc}") from None
    shape: list[int] = []

    def grab(act: torch.Tensor, hook: Any) -> None:
        shape[:] = list(act.shape)

    probe = torch.arange(1, 3, device=lm.device)[None, :]
    with torch.no_grad(), lm.sites_enabled([loaded.site]):  # one pass checks that the hook fires and its width
        lm.model.run_with_hooks(probe, fwd_hooks=[(loaded.hook_name, grab)], stop_at_layer=loaded.site.layer + 1)
    if not shape:
        raise InputError(f"SAE {loaded.spec!r} reads hook {loaded.hook_name}, which exists in this model but never "
                         "fires: this runtime cannot feed the SAE; use an SAE trained on another site")
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

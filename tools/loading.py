"""Load what a user names: a model spec or an SAE spec, toy-zoo specs included.

This is the entry point for specs that come from users (the CLI, run plans, tests): ``toy:NAME`` and
``toy:NAME/SAE`` are resolved through the zoo (:mod:`autoexplain.tools.zoo`, which builds the toy world on first
use) to local directories; everything else goes straight to :mod:`autoexplain.tools.models` and
:mod:`autoexplain.tools.saes`. The dependency runs one way: the zoo builds its models with ``models``, and
neither ``models`` nor ``saes`` knows the zoo.
"""

from __future__ import annotations

from collections.abc import Sequence

from autoexplain.tools import models, saes
from autoexplain.tools.errors import InputError
from autoexplain.tools.models import TOY_PREFIX, LoadedModel
from autoexplain.tools.saes import LoadedSAE
from autoexplain.tools.zoo import ensure_model


def check_specs(model: str, sae_specs: Sequence[str] = ()) -> None:
    """Check a model spec and SAE specs as far as can be done without loading any weights (paths exist and hold
    what they should, hub names are cached or reachable, architectures are causal LMs, releases are known, SAE
    training settings can be honoured and agree across SAEs); raise :class:`InputError` (one line) on the first
    problem. Call it at the boundary, before anything loads."""
    if not model.strip().startswith(TOY_PREFIX):
        models.check_model_spec(model)
    for spec in sae_specs:
        if spec.strip().startswith(TOY_PREFIX):
            if not spec.strip()[len(TOY_PREFIX):].partition("/")[2]:
                raise InputError(f"toy SAE spec {spec!r} needs a name: write toy:MODEL/NAME, e.g. toy:small/res0")
            continue
        saes.check_sae_spec(spec)
    sae_model_settings(sae_specs)


def sae_model_settings(sae_specs: Sequence[str]) -> dict[str, bool]:
    """The processing flags the SAEs ``sae_specs`` agree the model must be loaded with (``{}``: unprocessed), read
    without loading weights (:func:`autoexplain.tools.saes.model_settings`). Toy SAEs are trained by the zoo on
    the unprocessed toy model and ask for nothing. SAEs that disagree (one trained on a processed model, one on
    the plain model) cannot share one model: :class:`InputError` naming the setting."""
    chosen: dict[str, bool] | None = None
    first = ""
    for spec in sae_specs:
        spec = spec.strip()
        settings = {} if spec.startswith(TOY_PREFIX) else saes.model_settings(spec)
        if chosen is None:
            chosen, first = settings, spec
            continue
        for flag in models.PROCESSING_FLAGS:
            if bool(settings.get(flag)) != bool(chosen.get(flag)):
                on, off = (spec, first) if settings.get(flag) else (first, spec)
                raise InputError(f"SAEs disagree on the model's weight processing: {on!r} was trained with "
                                 f"{flag}=True, {off!r} without it; one model cannot give both their training "
                                 "activations, so harvest them in separate runs")
    return dict(chosen or {})


def load_model(spec: str, device: str | None = None, *, check: bool = True,
               sae_specs: Sequence[str] = ()) -> LoadedModel:
    """Load the model ``spec``: a local HF directory, a hub name, or ``toy:NAME`` (built on first use).

    ``sae_specs``: the SAEs that will be spliced into it; the model is loaded the way they were trained on it
    (a sae-lens release's or cfg.json's ``model_from_pretrained_kwargs``, see :func:`sae_model_settings`), and its
    model id then names the processing (``gpt2+center_writing_weights``). Without processing the id is unchanged.
    A toy model keeps ``toy:NAME`` as its spec and gets the model id ``toy:NAME@FINGERPRINT``.
    """
    spec = spec.strip()
    processing = sae_model_settings(sae_specs)
    if not spec.startswith(TOY_PREFIX):
        return models.load_model(spec, device, check=check, processing=processing)
    built = ensure_model(spec[len(TOY_PREFIX):])
    lm = models.load_model(str(built.model_dir), device, check=False, processing=processing)
    lm.spec = spec
    lm.model_id = models.processed_model_id(f"{spec}@{built.fingerprint}", processing)
    lm.meta["toy"] = built.name
    if check:
        lm.check_sites()
    return lm


def load_sae(spec: str, lm: LoadedModel) -> LoadedSAE:
    """Load the SAE ``spec`` for ``lm``: an sae-lens directory, RELEASE/SAE_ID, or ``toy:MODEL/NAME``."""
    spec = spec.strip()
    if not spec.startswith(TOY_PREFIX):
        return saes.load_sae(spec, lm)
    model_name, _, sae_name = spec[len(TOY_PREFIX):].partition("/")
    if not sae_name:
        raise InputError(f"toy SAE spec {spec!r} needs a name: write toy:MODEL/NAME, e.g. toy:small/res0")
    return saes.load_sae_dir(ensure_model(model_name).sae_dir(sae_name), lm, spec=spec)

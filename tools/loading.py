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
    what they should, hub names are cached or reachable, architectures are causal LMs); raise
    :class:`InputError` (one line) on the first problem. Call it at the boundary, before anything loads."""
    if not model.strip().startswith(TOY_PREFIX):
        models.check_model_spec(model)
    for spec in sae_specs:
        if spec.strip().startswith(TOY_PREFIX):
            if not spec.strip()[len(TOY_PREFIX):].partition("/")[2]:
                raise InputError(f"toy SAE spec {spec!r} needs a name: write toy:MODEL/NAME, e.g. toy:small/res0")
            continue
        saes.check_sae_spec(spec)


def load_model(spec: str, device: str | None = None, *, check: bool = True,
               sae_specs: Sequence[str] = ()) -> LoadedModel:
    """Load the model ``spec``: a local HF directory, a hub name, or ``toy:NAME`` (built on first use).

    ``sae_specs``: the SAEs that will be spliced into it; the model is loaded the way they were trained on it
    (e.g. a sae-lens release's ``model_from_pretrained_kwargs``), see :func:`autoexplain.tools.saes.model_settings`.
    A toy model keeps ``toy:NAME`` as its spec and gets the model id ``toy:NAME@FINGERPRINT``.
    """
    spec = spec.strip()
    if not spec.startswith(TOY_PREFIX):
        return models.load_model(spec, device, check=check)
    built = ensure_model(spec[len(TOY_PREFIX):])
    lm = models.load_model(str(built.model_dir), device, check=False)
    lm.spec = spec
    lm.model_id = f"{spec}@{built.fingerprint}"
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

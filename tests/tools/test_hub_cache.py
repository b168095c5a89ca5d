"""Issue 12: hub names resolve through the local Hugging Face cache (online or offline), sae-lens release settings
are honoured (the model is loaded the way the SAE was trained on it), and what is neither cached nor reachable is
refused at once in one line.

The cache is laid out by :mod:`hf_cache` (a tiny 9-layer GPT-2 under TransformerLens' repo for ``gpt2``, and the
``gpt2-small-res-jb`` SAE ``blocks.8.hook_resid_pre`` whose release entry asks for ``center_writing_weights``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hf_cache import RELEASE, SAE_ID, GPT2World, build_gpt2_world, hub_env

from autoexplain.tools import loading, models, saes
from autoexplain.tools.errors import InputError

from cli_support import CLI, cli_env

SPEC = f"{RELEASE}/{SAE_ID}"
TEXTS = ["the cat sat on the mat and the dog ran", "Mary and John went to the store , John gave a drink to"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> GPT2World:
    return build_gpt2_world(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture
def cache(world: GPT2World, monkeypatch: pytest.MonkeyPatch) -> GPT2World:
    """This process resolves the hub through ``world``'s cache, offline (every lookup reads these per call)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(world.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return world


def _release_kwargs() -> dict:
    """The release's model_from_pretrained_kwargs, read from sae-lens' own directory (not from our code)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    kwargs = dict((get_pretrained_saes_directory()[RELEASE].config_overrides or {})["model_from_pretrained_kwargs"])
    assert kwargs == {"center_writing_weights": True}  # the release this test is about asks for processing
    return kwargs


def _cli(args: list[str], world: GPT2World, cwd: Path, *, offline: bool = True) -> subprocess.CompletedProcess:
    env = {**cli_env(cwd), **hub_env(world.root, offline=offline)}
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- the user's commands, offline
def test_cli_check_loads_cached_hub_names_offline(world: GPT2World, tmp_path: Path) -> None:
    p = _cli(["check", "--model", "gpt2", "--sae", SPEC], world, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    out = " ".join(p.stdout.split())
    assert "gpt2+center_writing_weights" in out, out  # loaded with the release's processing
    assert f"SAE {SPEC}" in out and "resid_pre.8" in out, out


def test_cli_uncached_names_exit_2_in_one_line(world: GPT2World, tmp_path: Path) -> None:
    p = _cli(["check", "--model", "EleutherAI/pythia-70m"], world, tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    err = " ".join(p.stderr.split())
    assert f"not cached in {world.cache}" in err and "HF_HUB_OFFLINE is set" in err, err
    assert "Traceback" not in p.stderr
    other = "gpt2-small-res-jb/blocks.7.hook_resid_pre"  # a release id whose files are not cached
    p = _cli(["check", "--model", "gpt2", "--sae", other], world, tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    err = " ".join(p.stderr.split())
    assert f"SAE '{other}'" in err and f"not cached in {world.cache}" in err and "HF_HUB_OFFLINE" in err, err


def test_uncached_names_are_refused_fast_without_loading(cache: GPT2World) -> None:
    loading.check_specs("gpt2", [SPEC])  # warm the imports; cached: fine
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=rf"'EleutherAI/pythia-70m' .*not cached in {cache.cache} .*HF_HUB_OFFLINE"):
        loading.check_specs("EleutherAI/pythia-70m")
    with pytest.raises(InputError, match=r"blocks\.7\.hook_resid_pre.*not cached in .*unavailable"):
        loading.check_specs("gpt2", ["gpt2-small-res-jb/blocks.7.hook_resid_pre"])
    with pytest.raises(InputError, match=r"neither .* nor a model name TransformerLens knows"):
        loading.check_specs("no-such-model-name")
    with pytest.raises(InputError, match=r"RELEASE/SAE_ID"):
        loading.check_specs("gpt2", ["no-such-release/blocks.0"])
    with pytest.raises(InputError, match=r"release 'gpt2-small-res-jb' has no SAE 'blocks\.99'"):
        loading.check_specs("gpt2", ["gpt2-small-res-jb/blocks.99"])
    assert time.perf_counter() - t0 < 5


# ----------------------------------------------------------------------------- online, hub unreachable
@contextlib.contextmanager
def _recording_endpoint() -> Iterator[list[str]]:
    """A local hub endpoint that records every connection made to it and closes it at once (so a client that does
    ask the network fails fast and falls back to the cache, instead of hanging the test). Yields the record; its
    first entry is the endpoint URL."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.1)
    record = [f"http://127.0.0.1:{srv.getsockname()[1]}"]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            record.append("connection")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        stop.set()
        thread.join()
        srv.close()


def test_cached_names_load_online_without_asking_the_network(cache: GPT2World,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    loading.check_specs("gpt2", [SPEC])  # warm the imports
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    models._probe.cache_clear()
    with _recording_endpoint() as record:
        monkeypatch.setattr(constants, "ENDPOINT", record[0])
        assert models.hub_unreachable() is None  # the hub looks reachable (the probe's own connection)
        deadline = time.monotonic() + 5
        while len(record) < 2 and time.monotonic() < deadline:  # the server thread has seen the probe
            time.sleep(0.01)
        assert record[1:] == ["connection"]
        probes = len(record)
        loading.check_specs("gpt2", [SPEC])
        lm = loading.load_model("gpt2", device="cpu", check=False, sae_specs=[SPEC])
        loading.load_sae(SPEC, lm)
        assert lm.model_id == "gpt2+center_writing_weights"
        time.sleep(0.3)  # the server thread accepts within 0.1 s
        assert len(record) == probes, f"{len(record) - probes} connections to the hub for cached files"
        assert not constants.HF_HUB_OFFLINE  # switched off only for the load


def test_unreachable_hub_online_is_named(cache: GPT2World, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    models._probe.cache_clear()
    with pytest.raises(InputError, match=r"not cached in .* unavailable \(hub\.invalid does not resolve\)"):
        loading.check_specs("EleutherAI/pythia-70m")
    loading.check_specs("gpt2", [SPEC])  # cached: no network needed


# ----------------------------------------------------------------------------- parity with sae-lens
def test_feature_activations_match_sae_lens_and_differ_unprocessed(cache: GPT2World) -> None:
    from sae_lens import SAE, HookedSAETransformer

    from autoexplain.tools.models import hub_offline

    kwargs = _release_kwargs()
    lm = loading.load_model("gpt2", device="cpu", sae_specs=[SPEC])
    assert lm.model_id == "gpt2+center_writing_weights" and lm.processing == kwargs
    sae = loading.load_sae(SPEC, lm)
    assert (sae.prepend_bos, sae.context_size, sae.model_settings) == (True, 128, kwargs)
    toks = lm.to_tokens(TEXTS)
    ours = saes.feature_activations(lm, sae, toks)
    assert int((ours > 0).sum()) > 50  # features fire: the comparison below is not between zeros

    with hub_offline(), models._quiet(), pytest.warns(UserWarning, match="model_from_pretrained_kwargs"):
        ref_sae = SAE.from_pretrained(RELEASE, SAE_ID, device="cpu")
    key = f"{SAE_ID}.hook_sae_acts_post"
    with hub_offline(), models._quiet():
        for load in (HookedSAETransformer.from_pretrained, HookedSAETransformer.from_pretrained_no_processing):
            ref_model = load("gpt2", device="cpu", **kwargs)  # as the issue asks / as sae-lens' warning says
            with torch.no_grad():
                _, ref_cache = ref_model.run_with_cache_with_saes(toks, saes=[ref_sae], names_filter=[key])
            torch.testing.assert_close(ours, ref_cache[key], atol=1e-4, rtol=1e-4)

    plain = loading.load_model("gpt2", device="cpu")
    assert plain.model_id == "gpt2" and plain.processing == {}  # unprocessed loads keep today's id
    unprocessed = saes.feature_activations(plain, sae, toks)
    assert (unprocessed - ours).abs().max() > 1e-2
    with pytest.raises(InputError, match=r"trained on the model loaded with center_writing_weights=True.* without it"):
        loading.load_sae(SPEC, plain)


def test_local_dirs_honour_cfg_settings_like_the_release(cache: GPT2World, tmp_path: Path) -> None:
    """A local copy of the model and of the SAE (its cfg.json carrying the release's kwargs) loads processed, with
    the same activations as the hub names; fold_ln on a local dir matches TransformerLens' own hub load."""
    import json

    model_dir, sae_dir = tmp_path / "gpt2", tmp_path / "sae"
    shutil.copytree(cache.model_snapshot, model_dir, symlinks=False)
    shutil.copytree(cache.sae_snapshot / SAE_ID, sae_dir, symlinks=False)
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    (sae_dir / "cfg.json").write_text(json.dumps({**cfg, "model_from_pretrained_kwargs": _release_kwargs()}))
    assert saes.model_settings(str(sae_dir)) == {"center_writing_weights": True}

    hub = loading.load_model("gpt2", device="cpu", check=False, sae_specs=[SPEC])
    local = loading.load_model(str(model_dir), device="cpu", check=False, sae_specs=[str(sae_dir)])
    assert local.model_id.endswith("+center_writing_weights")
    toks = hub.to_tokens(TEXTS)
    a = saes.feature_activations(hub, loading.load_sae(SPEC, hub), toks)
    b = saes.feature_activations(local, loading.load_sae(str(sae_dir), local), toks)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    flags = {"fold_ln": True, "center_writing_weights": True}
    hub_f = models.load_model("gpt2", device="cpu", check=False, processing=flags)
    local_f = models.load_model(str(model_dir), device="cpu", check=False, processing=flags)
    assert local_f.model.cfg.normalization_type == hub_f.model.cfg.normalization_type == "LNPre"
    with torch.no_grad():
        torch.testing.assert_close(local_f.model(toks), hub_f.model(toks), atol=1e-4, rtol=1e-4)


def test_sae_settings_must_agree(cache: GPT2World, tmp_path: Path) -> None:
    """One SAE trained on the processed model and one on the plain model cannot share one model."""
    shutil.copytree(cache.sae_snapshot / SAE_ID, tmp_path / "plain", symlinks=False)  # cfg.json asks for nothing
    assert saes.model_settings(str(tmp_path / "plain")) == {}
    assert loading.sae_model_settings(["toy:tiny/res0", "toy:tiny/res1"]) == {}
    with pytest.raises(InputError, match=r"disagree .*center_writing_weights=True"):
        loading.check_specs("gpt2", [SPEC, str(tmp_path / "plain")])
    with pytest.raises(InputError, match=r"disagree"):
        loading.load_model("gpt2", device="cpu", sae_specs=[str(tmp_path / "plain"), SPEC])


def test_environment_variables_point_the_libraries_at_the_cache(world: GPT2World) -> None:
    """The layout is the one huggingface_hub itself reads, through its own environment variables."""
    code = ("from huggingface_hub import snapshot_download, try_to_load_from_cache as t; import sys; "
            f"print(snapshot_download('{world.model_repo}', local_files_only=True)); "
            f"print(t('{world.sae_repo}', '{SAE_ID}/cfg.json'))")
    env = {**os.environ, **hub_env(world.root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out == [str(world.model_snapshot), str(world.sae_snapshot / SAE_ID / "cfg.json")]

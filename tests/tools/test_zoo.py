"""The toy world: deterministic build, every part present and loadable through the public loaders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from autoexplain.tools import zoo
from autoexplain.tools.data import load_task_file, load_texts, tokenize_task
from autoexplain.tools.loading import load_model, load_sae

MICRO = zoo.ZooSpec(name="micro", d_model=32, n_ctx=32, train_steps=12, batch_size=8, corpus_docs=200,
                    task_prompts=8, saes=(zoo.SAESpec(name="res0", site="resid_post.0", d_sae=32, k=2,
                                                      samples=4096),))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = zoo.build(MICRO, tmp_path / "a")
    b = zoo.build(MICRO, tmp_path / "b")
    for rel in ("model/model.safetensors", "model/vocab.json", "saes/res0/sae_weights.safetensors",
                "corpus/train.txt", "tasks/ioi.json", "tasks/greater_than.json"):
        assert _digest(tmp_path / "a" / rel) == _digest(tmp_path / "b" / rel), rel
    assert a["task_accuracy"] == b["task_accuracy"]
    assert not list(tmp_path.glob("*.building*")), "scratch folder left behind"


def test_an_interrupted_build_resumes_from_its_first_unfinished_stage(tmp_path: Path) -> None:
    """Ctrl-C during SAE training: one line saying what was kept; the next build does not retrain the model, and
    its result equals an uninterrupted build's."""
    from autoexplain.tools.errors import Interrupted

    def stop_at_sae(stage: str, done: int, total: int) -> None:
        if stage.startswith("train SAE"):
            raise KeyboardInterrupt

    root = tmp_path / "w"
    with pytest.raises(Interrupted, match=r"keeps its finished stages \(tokenizer, model\)"):
        zoo.build(MICRO, root, progress=stop_at_sae)
    assert not root.exists() and (tmp_path / "w.building").is_dir()
    stages: list[str] = []
    zoo.build(MICRO, root, progress=lambda stage, done, total: stages.append(stage))
    assert not any(s.startswith("train model") for s in stages), "the model was trained again"
    assert any(s.startswith("train SAE") for s in stages)
    assert not (tmp_path / "w.building").exists()
    fresh = zoo.build(MICRO, tmp_path / "fresh")
    for rel in ("model/model.safetensors", "saes/res0/sae_weights.safetensors", "tasks/ioi.json"):
        assert _digest(root / rel) == _digest(tmp_path / "fresh" / rel), rel
    assert json.loads((root / "manifest.json").read_text())["saes"] == fresh["saes"]


def test_tiny_zoo_parts(tiny_zoo) -> None:
    m = tiny_zoo.manifest
    assert set(m["task_accuracy"]) == set(zoo.TASKS)
    assert [s["site"] for s in m["saes"]] == ["resid_post.0", "mlp_out.1"]  # two different sites
    assert all(0.0 <= a <= 1.0 for a in m["task_accuracy"].values())
    assert m["corpus"]["documents"] == 3000 and len(load_texts(str(tiny_zoo.corpus))) == 3000
    cats = json.loads((tiny_zoo.root / "corpus" / "categories.json").read_text())
    assert set(cats) == set(zoo.CATEGORIES) and "Mary" in cats["name"]
    # the model is a normal HF directory and loads through the same loader as a user's model
    assert (tiny_zoo.model_dir / "config.json").exists() and (tiny_zoo.model_dir / "tokenizer.json").exists()
    lm = load_model("toy:tiny", device="cpu")
    for words in zoo.CATEGORIES.values():
        for w in words:
            assert len(lm.tokenizer.tokenize(" " + w)) == 1, w
    for sae in m["saes"]:
        s = load_sae(f"toy:tiny/{sae['name']}", lm)
        assert s.d_sae == sae["d_sae"] and str(s.site) == sae["site"]
        assert 0 <= sae["fvu"] < 0.5, "an SAE that reconstructs nothing is no SAE"
    for task in zoo.TASKS:
        tt = tokenize_task(load_task_file(tiny_zoo.task_file(task)), lm.tokenizer, n_ctx=lm.n_ctx)
        assert tt.n_prompts == 40
        assert zoo.task_accuracy(lm, tt) == m["task_accuracy"][task]


def test_stale_task_files_are_regenerated_without_retraining(tmp_path: Path) -> None:
    root = tmp_path / "built"
    zoo.build(MICRO, root)
    weights = _digest(root / "model" / "model.safetensors")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tasks_format"] = zoo.TASKS_FORMAT - 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "tasks" / "ioi.json").write_text("{}")
    zoo._refresh_tasks(MICRO, root)
    assert json.loads((root / "manifest.json").read_text())["tasks_format"] == zoo.TASKS_FORMAT
    assert load_task_file(root / "tasks" / "ioi.json").prompts
    assert _digest(root / "model" / "model.safetensors") == weights


def test_second_use_does_not_rebuild(tiny_zoo) -> None:
    before = (tiny_zoo.root / "manifest.json").stat().st_mtime_ns
    again = zoo.ensure_model("tiny")
    assert again.root == tiny_zoo.root and (again.root / "manifest.json").stat().st_mtime_ns == before


def test_task_files_are_consistent() -> None:
    """Answers of generated tasks are correct by construction (checked on the strings, not a model)."""
    ioi = zoo.task_prompts("ioi", 7, 50)["prompts"]
    for p in ioi:
        names = [w.strip(",") for w in p["clean"].split() if w.strip(",") in zoo.CATEGORIES["name"]]
        a, b, s = names
        assert s == b and p["answers"] == [f" {a}"] and p["wrong_answers"] == [f" {b}"]
        # the corrupt prompt swaps the two names' order: the first-name shortcut's answer flips to b
        corrupt = [w.strip(",") for w in p["corrupt"].split() if w.strip(",") in zoo.CATEGORIES["name"]]
        assert corrupt == [b, a, b]
    gt = zoo.task_prompts("greater_than", 7, 50)["prompts"]
    for p in gt:
        x = int(p["clean"].split()[-2])
        assert all(int(a) > x for a in p["answers"]) and all(int(w) <= x for w in p["wrong_answers"])
    ind = zoo.task_prompts("induction", 7, 50)["prompts"]
    for p in ind:
        first, _, second = p["clean"].partition(" , ")
        seq, k = first.split(), len(second.split())
        assert p["answers"] == [f" {seq[k]}"] and second.split() == seq[:k]


def test_unknown_toy_names() -> None:
    from autoexplain.tools.errors import InputError

    with pytest.raises(InputError, match="unknown toy model"):
        zoo.get_spec("huge")


@pytest.mark.slow
def test_a_rebuilt_small_zoo_solves_its_tasks(tmp_path: Path) -> None:
    """Retrained from scratch (not the shipped copy; about 3 minutes on 2 idle cores), the demo's toy world still
    solves every task it ships."""
    spec = zoo.get_spec("small")
    zoo.build(spec, tmp_path / "small")
    built = zoo.BuiltZoo("small", tmp_path / "small", spec.fingerprint(),
                         json.loads((tmp_path / "small" / "manifest.json").read_text()))
    lm = load_model(str(built.model_dir), device="cpu")
    for task in zoo.TASKS:
        tt = tokenize_task(load_task_file(built.task_file(task)), lm.tokenizer, n_ctx=lm.n_ctx)
        with torch.no_grad():
            assert zoo.task_accuracy(lm, tt) >= 0.95, task


def test_sae_ids_do_not_depend_on_the_cache_location(tmp_path: Path) -> None:
    """Two separate builds in different folders give the same sae_id (a content hash of config + weights), so
    results stay keyed across machines; a path written into cfg.json would break this."""
    from autoexplain.tools.saes import load_sae

    ids = []
    for root in (tmp_path / "a", tmp_path / "elsewhere" / "b"):
        zoo.build(MICRO, root)
        lm = load_model(str(root / "model"), device="cpu")
        ids.append(load_sae(str(root / "saes" / "res0"), lm).sae_id)
    assert ids[0] == ids[1]


def test_a_process_waiting_for_another_build_says_so(tmp_path: Path) -> None:
    """``zoo path`` while another process builds the same world: a line on stderr naming the builder, not silence."""
    import fcntl
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "AUTOEXPLAIN_CACHE": str(tmp_path)}
    root = tmp_path / "zoo" / f"tiny-{zoo.get_spec('tiny').fingerprint()}"
    root.parent.mkdir(parents=True)
    lock = root.parent / f".{root.name}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write("pid 4242: building tiny\n")
        fh.flush()
        proc = subprocess.Popen([sys.executable, "-m", "autoexplain.agent.cli", "zoo", "path", "--name", "tiny"],
                                env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        try:
            deadline = time.monotonic() + 60
            line = ""
            assert proc.stderr is not None
            while time.monotonic() < deadline and "waiting" not in line:
                line = proc.stderr.readline()
            assert "waiting for pid 4242: building tiny" in line, line
            assert proc.poll() is None, "it should wait for the builder, not fail"
        finally:
            proc.kill()
            proc.wait()


def test_the_package_ships_every_named_world() -> None:
    """Each named toy world ships as an archive whose fingerprint is the current spec's: a recipe change without a
    re-pack fails here (rather than silently making every user train for minutes)."""
    for name, spec in zoo.zoo_specs().items():
        archive = zoo.shipped_archive(spec)
        assert archive is not None, f"no shipped toy:{name}: run autoexplain zoo build --name {name} --rebuild, " \
                                    f"then autoexplain zoo pack --name {name}"
        assert archive.stat().st_size < 5_000_000, "a shipped world should stay a few MB"


def test_pack_then_unpack_gives_the_same_world(tmp_path: Path) -> None:
    zoo.build(MICRO, tmp_path / "built" / "micro-x")
    built = zoo.BuiltZoo("micro", tmp_path / "built" / "micro-x", MICRO.fingerprint(),
                         json.loads((tmp_path / "built" / "micro-x" / "manifest.json").read_text()))
    archive = zoo.pack(built, tmp_path / "ship")
    root = tmp_path / "cache" / "micro-x"
    zoo.unpack(archive, MICRO, root)
    for rel in ("model/model.safetensors", "model/tokenizer.json", "saes/res0/sae_weights.safetensors",
                "saes/res0/cfg.json", "corpus/train.txt", "tasks/ioi.json"):
        assert _digest(root / rel) == _digest(built.root / rel), rel
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["installed_from"] == archive.name and manifest["fingerprint"] == MICRO.fingerprint()
    assert not list((tmp_path / "cache").glob("*.unpacking"))
    # an archive of another world is refused, and nothing is left half-unpacked
    other = MICRO.model_copy(update={"seed": 1})
    with pytest.raises(RuntimeError, match="stale"):
        zoo.unpack(archive, other, tmp_path / "cache" / "other")
    assert not (tmp_path / "cache" / "other").exists()


def test_first_use_unpacks_the_shipped_world_without_training(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOEXPLAIN_CACHE", str(tmp_path))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the shipped world should not be trained")

    monkeypatch.setattr(zoo, "build", no_training)
    built = zoo.ensure_model("tiny")
    assert built.manifest["installed_from"] == zoo.archive_name(zoo.get_spec("tiny"))
    assert (built.model_dir / "model.safetensors").exists()
    lm = load_model(str(built.model_dir), device="cpu")
    tt = tokenize_task(load_task_file(built.task_file("induction")), lm.tokenizer, n_ctx=lm.n_ctx)
    assert zoo.task_accuracy(lm, tt) == built.manifest["task_accuracy"]["induction"]

"""The toy world: a corpus with known structure, a GPT-2 trained on it, SAEs trained with sae-lens, task files.

Why: no weights can be downloaded here, and ground truth needs structure we know. The zoo builds, on first use
and deterministically (fixed seeds, fixed step counts), everything the demo and the tests need:

* ``corpus/``: a synthetic corpus from word categories (names, animals, colours, foods, places, objects, events)
  and templates: IOI-style sentences ("When Mary and John went to the park, John gave a ball to Mary."), induction
  sequences (a random word list, then the same list again), greater-than sentences ("The war lasted from 32 to
  57."), category sentences, and facts: a fixed mapping :data:`FACTS` from each animal to its home, stated in
  templated sentences ("The red cow lives in the barn."), the toy world's factual-recall task (causal tracing's
  subject). ``categories.json`` records every word's category: the ground truth for feature labels.
* ``model/``: a small GPT-2 (transformers ``GPT2LMHeadModel`` + a byte-level BPE tokenizer trained on the
  corpus, every corpus word one token) saved with ``save_pretrained`` — loaded through the same loader as a
  user's model.
* ``saes/NAME/``: TopK SAEs trained with sae-lens' ``SAETrainer`` on two sites, saved in sae-lens format.
* ``tasks/*.json``: circuit task files (auto-circuit layout) from a held-out seed, with the model's top-1
  accuracy on each in ``manifest.json``.

Shipped artifacts: training takes minutes on 2 cores (much longer on a busy machine), so the package ships each
named world's built folder as ``zoo_data/NAME-FINGERPRINT.tar.xz`` (a few MB). On first use :func:`ensure_model`
unpacks the archive whose fingerprint equals the current spec's into the cache and loads it through the same
public loaders as a built one; a spec with no matching archive (a changed recipe) is trained as before, and
``autoexplain zoo build --rebuild`` always retrains. :func:`pack` writes the archive of a built world.

Caveat: a trained toy model solves its tasks, but rarely with the textbook circuit; known-answer circuit tests use
hand-planted models instead. The build is deterministic for a given machine's thread count; the cache key is the
spec's fingerprint, not the weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from autoexplain.tools.cache import cache_root
from autoexplain.tools.errors import InputError
from autoexplain.tools.models import LoadedModel, hook_name, load_model

if TYPE_CHECKING:
    from autoexplain.tools.data import TokenizedTask

ZOO_FORMAT = 3  # bump when the build recipe changes: the fingerprint changes and everything rebuilds
TASKS_FORMAT = 3  # bump when only the task files change: they are regenerated in place (seconds, no retraining)

# ----------------------------------------------------------------------------- the corpus grammar
CATEGORIES: dict[str, tuple[str, ...]] = {
    "name": ("Mary", "John", "Alice", "Bob", "Tom", "Sarah", "James", "Emma", "David", "Lucy", "Peter", "Anna",
             "Kate", "Mark", "Paul", "Jane"),
    "animal": ("cat", "dog", "fox", "owl", "horse", "bear", "wolf", "mouse", "lion", "duck"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "purple", "orange"),
    "food": ("bread", "apple", "cheese", "soup", "rice", "cake", "milk", "egg"),
    "place": ("store", "park", "school", "market", "garden", "river", "beach", "church"),
    "object": ("ball", "book", "drink", "key", "letter", "ring", "hat", "cup"),
    "event": ("war", "strike", "drought", "festival", "trip", "storm"),
    "number": tuple(str(n) for n in range(10, 100)),
    "home": ("barn", "den", "nest", "cave", "pond", "hive", "burrow", "stable", "meadow", "forest"),
}
#: The toy world's facts: where each animal lives. A fixed, arbitrary permutation (drawn once with
#: ``random.Random(13).sample(homes, 10)``, then written out so it cannot drift), not the natural one (the owl
#: lives in the hive), so the model can only know it by memorising the corpus: a factual-recall task whose answer
#: depends on the subject token alone ("The red owl lives in the" -> " hive").
FACTS: dict[str, str] = {
    "cat": "pond", "dog": "forest", "fox": "nest", "owl": "hive", "horse": "den",
    "bear": "burrow", "wolf": "meadow", "mouse": "stable", "lion": "barn", "duck": "cave",
}
#: Words an induction sequence is drawn from (categories whose members carry no order of their own).
INDUCTION_POOL = CATEGORIES["animal"] + CATEGORIES["color"] + CATEGORIES["food"] + CATEGORIES["object"]


def _ioi(rng: random.Random) -> tuple[str, str, str, str]:
    """(prompt, answer, corrupt prompt, wrong answer) for an IOI-style sentence: the answer is the name not repeated.

    Caveat, measured: the training templates always put the indirect object first, and the trained toy model
    learns that shortcut ("say the first name") rather than IOI proper; trained on both orders for 3,000 steps it
    learned neither (uniform over names). The corrupt prompt therefore swaps the order of the two names
    (``When B and A …, B gave … to``): the shortcut's answer flips from A to B, so circuit search has a strong
    signal and finds the circuit of the behaviour the model really has. Known-answer IOI-like circuits are tested
    on hand-planted models instead.
    """
    a, b, _ = rng.sample(CATEGORIES["name"], 3)  # the third draw keeps the corpus (and so the model) unchanged
    place, obj = rng.choice(CATEGORIES["place"]), rng.choice(CATEGORIES["object"])
    if rng.random() < 0.5:
        template = "When {X} and {Y} went to the {place}, {S} gave a {obj} to"
    else:
        template = "After {X} and {Y} met at the {place}, {S} handed the {obj} to"
    clean = template.format(X=a, Y=b, S=b, place=place, obj=obj)
    corrupt = template.format(X=b, Y=a, S=b, place=place, obj=obj)
    return clean, f" {a}", corrupt, f" {b}"


def _induction(rng: random.Random) -> tuple[str, str, str, str]:
    """A random word list, then its start again; the answer is the word that followed last time."""
    n = rng.randint(5, 8)
    seq = rng.sample(INDUCTION_POOL, n)
    k = rng.randint(1, n - 1)
    other = rng.choice([w for w in INDUCTION_POOL if w not in seq])
    clean = " ".join(seq) + " , " + " ".join(seq[:k])
    swapped = seq[:k] + [other] + seq[k + 1 :]
    corrupt = " ".join(swapped) + " , " + " ".join(seq[:k])
    return clean, f" {seq[k]}", corrupt, f" {other}"


def _fact(rng: random.Random) -> tuple[str, str, str, str, str]:
    """(prompt, answer, corrupt prompt, wrong answer, subject) for a fact: "The red owl lives in the" -> " hive".

    The corrupt prompt names another animal (with a different home, as every home is distinct) in the same frame,
    so the wrong answer is the other animal's home. The subject ("red owl") is two tokens, the animal last: the
    colour carries no information about the answer, so causal tracing should find the recall at the last subject
    token, as ROME found for GPT-2.
    """
    animal, other = rng.sample(CATEGORIES["animal"], 2)
    color = rng.choice(CATEGORIES["color"])
    frame = "The {color} {animal} lives in the"
    return (frame.format(color=color, animal=animal), f" {FACTS[animal]}",
            frame.format(color=color, animal=other), f" {FACTS[other]}", f"{color} {animal}")


def _greater_than(rng: random.Random) -> tuple[str, int]:
    x = rng.randint(11, 98)
    return f"The {rng.choice(CATEGORIES['event'])} lasted from {x} to", x


def _document(rng: random.Random) -> str:
    """One document of the training corpus."""
    r = rng.random()
    if r < 0.25:
        prompt, answer, _, _ = _ioi(rng)
        return f"{prompt}{answer}."
    if r < 0.5:
        n = rng.randint(5, 8)
        seq = rng.sample(INDUCTION_POOL, n)
        return " ".join(seq) + " , " + " ".join(seq) + " ."
    if r < 0.7:
        prompt, x = _greater_than(rng)
        return f"{prompt} {rng.randint(x + 1, 99)}."
    if r < 0.8:
        animal, color = rng.choice(CATEGORIES["animal"]), rng.choice(CATEGORIES["color"])
        return rng.choice((
            f"The {animal} lives in the {FACTS[animal]}.",
            f"The {color} {animal} lives in the {FACTS[animal]}.",
            f"At night the {color} {animal} goes back to the {FACTS[animal]}.",
        ))
    c = {k: rng.choice(v) for k, v in CATEGORIES.items()}
    f2 = rng.choice(CATEGORIES["food"])
    return rng.choice((
        f"The {c['color']} {c['animal']} ate the {c['food']} near the {c['place']}.",
        f"{c['name']} saw a {c['color']} {c['animal']} in the {c['place']}.",
        f"{c['name']} bought {c['food']} and {f2} at the {c['place']}.",
        f"{c['name']} found a {c['color']} {c['object']} by the {c['place']}.",
    ))


def documents(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n)]


def task_prompts(task: str, seed: int, n: int) -> dict[str, Any]:
    """A circuit task file (auto-circuit layout) with ``n`` prompts, from a seed the training never used."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        if task == "ioi":
            clean, ans, corrupt, wrong = _ioi(rng)
            prompts.append({"clean": clean, "corrupt": corrupt, "answers": [ans], "wrong_answers": [wrong]})
        elif task == "induction":
            clean, ans, corrupt, wrong = _induction(rng)
            prompts.append({"clean": clean, "corrupt": corrupt, "answers": [ans], "wrong_answers": [wrong]})
        elif task == "greater_than":
            clean, x = _greater_than(rng)
            corrupt = clean.replace(f"from {x} to", "from 10 to")
            prompts.append({"clean": clean, "corrupt": corrupt,
                            "answers": [f" {y}" for y in range(x + 1, 100)],
                            "wrong_answers": [f" {y}" for y in range(10, x + 1)]})
        elif task == "facts":
            clean, ans, corrupt, wrong, subject = _fact(rng)
            # "subject" is an extra key (task-file readers ignore it): the span causal tracing corrupts
            prompts.append({"clean": clean, "corrupt": corrupt, "answers": [ans], "wrong_answers": [wrong],
                            "subject": subject})
        else:
            raise ValueError(task)
    return {"name": task, "prompts": prompts}


TASKS = ("ioi", "induction", "greater_than", "facts")


# ----------------------------------------------------------------------------- specs
class SAESpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    site: str  # a vocab Site string, e.g. resid_post.0
    d_sae: int
    k: int
    samples: int


class ZooSpec(BaseModel):
    """Everything that determines a toy world; its hash is the cache key."""

    model_config = ConfigDict(frozen=True)

    name: str
    seed: int = 0
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    n_ctx: int = 64
    train_steps: int
    batch_size: int = 32
    lr: float = 2e-3
    corpus_docs: int = 20_000
    task_prompts: int = 100
    saes: tuple[SAESpec, ...] = Field(default=())

    def fingerprint(self) -> str:
        blob = json.dumps({"format": ZOO_FORMAT, **self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def zoo_specs() -> dict[str, ZooSpec]:
    """The named toy worlds. ``small`` is the demo's; ``tiny`` builds in well under a minute for tests."""
    return {
        "small": ZooSpec(name="small", train_steps=1800, saes=(
            SAESpec(name="res0", site="resid_post.0", d_sae=512, k=8, samples=400_000),
            SAESpec(name="mlp1", site="mlp_out.1", d_sae=512, k=8, samples=400_000),
        )),
        "tiny": ZooSpec(name="tiny", d_model=64, n_ctx=48, train_steps=300, corpus_docs=3000, task_prompts=40,
                        saes=(
                            SAESpec(name="res0", site="resid_post.0", d_sae=128, k=4, samples=60_000),
                            SAESpec(name="mlp1", site="mlp_out.1", d_sae=128, k=4, samples=60_000),
                        )),
    }


def get_spec(name: str) -> ZooSpec:
    specs = zoo_specs()
    if name not in specs:
        raise InputError(f"unknown toy model {name!r}: the zoo has {', '.join(sorted(specs))} (e.g. toy:small)")
    return specs[name]


@dataclass(frozen=True)
class BuiltZoo:
    name: str
    root: Path
    fingerprint: str
    manifest: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def sae_dir(self, sae: str) -> Path:
        d = self.root / "saes" / sae
        if not d.is_dir():
            have = ", ".join(s["name"] for s in self.manifest["saes"])
            raise InputError(f"toy model {self.name!r} has no SAE {sae!r}: it has {have} (e.g. toy:{self.name}/res0)")
        return d

    @property
    def corpus(self) -> Path:
        return self.root / "corpus" / "train.txt"

    def task_file(self, task: str) -> Path:
        return self.root / "tasks" / f"{task}.json"


# ----------------------------------------------------------------------------- build
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def zoo_root(spec: ZooSpec) -> Path:
    """Where the toy world ``spec`` is (or will be) built: one folder per fingerprint in the cache."""
    return cache_root() / "zoo" / f"{spec.name}-{spec.fingerprint()}"


def ensure_model(name: str, *, progress: Progress | None = None, rebuild: bool = False) -> BuiltZoo:
    """Return the toy world ``name``: from the cache; else unpacked from the package's shipped archive when its
    fingerprint matches; else (or with ``rebuild``) trained from scratch."""
    spec = get_spec(name)
    root = zoo_root(spec)
    manifest = root / "manifest.json"
    if rebuild or not manifest.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with _lock(root.parent / f".{root.name}.lock"):
            if rebuild or not manifest.exists():  # another process may have built it while we waited
                archive = None if rebuild else shipped_archive(spec)
                if archive is not None:
                    unpack(archive, spec, root)
                else:
                    with contextlib.ExitStack() as stack:
                        report = progress or stack.enter_context(_stderr_bars(f"building toy:{name} (first use)"))
                        build(spec, root, progress=report)
    if json.loads(manifest.read_text()).get("tasks_format") != TASKS_FORMAT:
        with _lock(root.parent / f".{root.name}.lock"):
            if json.loads(manifest.read_text()).get("tasks_format") != TASKS_FORMAT:
                _refresh_tasks(spec, root)
    return BuiltZoo(spec.name, root, spec.fingerprint(), json.loads(manifest.read_text()))


#: Where the package keeps the shipped toy worlds (package data of ``autoexplain.tools``).
SHIPPED_DIR = "zoo_data"


def archive_name(spec: ZooSpec) -> str:
    return f"{spec.name}-{spec.fingerprint()}.tar.xz"


def shipped_archive(spec: ZooSpec) -> Path | None:
    """The package's archive of ``spec``'s built world, or None when it ships none for this fingerprint."""
    from importlib.resources import as_file, files

    res = files("autoexplain.tools") / SHIPPED_DIR / archive_name(spec)
    if not res.is_file():
        return None
    with as_file(res) as path:  # a plain file for an installed or editable package
        return Path(path)


def unpack(archive: Path, spec: ZooSpec, root: Path) -> None:
    """Unpack a shipped world into ``root`` atomically (scratch folder, checked, renamed into place). The caller
    holds the build lock. An archive whose manifest names another fingerprint is refused (a packaging error)."""
    import tarfile

    tmp = root.with_name(root.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive, mode="r:xz") as tar:
            tar.extractall(tmp, filter="data")
        tops = [d for d in tmp.iterdir() if (d / "manifest.json").is_file()]
        if len(tops) != 1:
            raise RuntimeError(f"{archive} is not a packed toy world (one folder with a manifest.json)")
        src = tops[0]
        manifest = json.loads((src / "manifest.json").read_text())
        if manifest.get("fingerprint") != spec.fingerprint():
            raise RuntimeError(f"{archive} holds toy world {manifest.get('fingerprint')!r}, expected "
                               f"{spec.fingerprint()!r}: the package's zoo_data is stale (run autoexplain zoo pack)")
        manifest["installed_from"] = archive.name
        (src / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if root.exists():
            shutil.rmtree(root)
        src.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack(built: BuiltZoo, out_dir: Path) -> Path:
    """Write ``built`` as ``out_dir/NAME-FINGERPRINT.tar.xz`` (what the package ships), leaving out the
    cache-local ``installed_from`` mark. Returns the archive path."""
    import io
    import tarfile

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{built.name}-{built.fingerprint}.tar.xz"
    part = out.with_suffix(".part")
    with tarfile.open(part, mode="w:xz") as tar:
        for path in sorted(built.root.rglob("*")):
            if not path.is_file():
                continue
            arc = f"{built.root.name}/{path.relative_to(built.root)}"
            if path.name == "manifest.json" and path.parent == built.root:
                manifest = json.loads(path.read_text())
                manifest.pop("installed_from", None)
                data = json.dumps(manifest, indent=1).encode()
                info = tarfile.TarInfo(arc)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            else:
                info = tar.gettarinfo(str(path), arc)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    os.replace(part, out)
    return out


@contextlib.contextmanager
def _stderr_bars(title: str) -> Iterator[Progress]:
    """Progress bars on stderr (one per stage) for builds triggered by first use rather than the CLI."""
    import sys

    from tqdm.auto import tqdm

    print(title, file=sys.stderr)
    bars: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        key = stage.split(" (")[0]
        if key not in bars:
            bars[key] = tqdm(total=total, desc=key, file=sys.stderr, leave=True)
        bar = bars[key]
        bar.set_postfix_str(stage[len(key):].strip(" ()"), refresh=False)
        bar.update(done - bar.n)

    try:
        yield report
    finally:
        for bar in bars.values():
            bar.close()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold the build lock of a toy world; when another process holds it, say so on stderr once, then wait (that
    process is building the same world: when it finishes, the world is there)."""
    import sys

    from autoexplain.tools.locks import holder_of

    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {holder_of(path)} (the toy world in {path.parent} is being built or updated by "
                  "another process; this continues when it is done)", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}: building {path.name.removeprefix('.').removesuffix('.lock')}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: What a toy-world build has finished, in its scratch folder (``stages.json``): a stage listed there is not redone.
_STAGES_FILE = "stages.json"


def _stages(tmp: Path) -> dict[str, Any]:
    try:
        done = json.loads((tmp / _STAGES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return done if isinstance(done, dict) else {}


def _stage_done(tmp: Path, stage: str, value: Any) -> None:
    done = {**_stages(tmp), stage: value}
    part = tmp / (_STAGES_FILE + ".tmp")
    part.write_text(json.dumps(done, indent=1))
    os.replace(part, tmp / _STAGES_FILE)


def build(spec: ZooSpec, root: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Build the toy world into ``root`` atomically: into a scratch folder, renamed into place when complete.

    Resumable: the scratch folder (``<root>.building``; the caller holds the build lock) records each finished
    stage (tokenizer, model, each SAE) in ``stages.json``, so a build stopped by Ctrl-C or a crash continues from
    the first unfinished stage when run again, reusing what was saved. Each stage's output depends only on the
    spec (seeded), so a resumed build equals an uninterrupted one.
    """
    report = progress or (lambda stage, done, total: None)
    for stale in root.parent.glob(root.name + ".building-*"):  # scratch folders of an older, per-process layout
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root.with_name(root.name + ".building")
    done = _stages(tmp)
    if not done or done.get("fingerprint") != spec.fingerprint():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _stage_done(tmp, "fingerprint", spec.fingerprint())
        done = _stages(tmp)
    elif done:
        report(f"resuming the build after: {', '.join(k for k in done if k != 'fingerprint')}", 0, 1)
    timings: dict[str, float] = dict(done.get("timings") or {})
    t0 = time.perf_counter()
    try:
        return _build_stages(spec, root, tmp, done, timings, report, t0)
    except KeyboardInterrupt:
        from autoexplain.tools.errors import Interrupted

        kept = [k for k in _stages(tmp) if k not in ("fingerprint", "timings")]
        raise Interrupted(f"interrupted: the toy world build keeps its finished stages ({', '.join(kept) or 'none'}) "
                          f"in {tmp}; run the same command again to continue from there") from None


def _build_stages(spec: ZooSpec, root: Path, tmp: Path, done: dict[str, Any], timings: dict[str, float],
                  report: Progress, t0: float) -> dict[str, Any]:
    corpus = documents(spec.seed, spec.corpus_docs)
    if "tokenizer" in done:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp / "model"))
    else:
        (tmp / "corpus").mkdir(exist_ok=True)
        (tmp / "corpus" / "train.txt").write_text("\n".join(corpus) + "\n")
        (tmp / "corpus" / "categories.json").write_text(json.dumps(CATEGORIES, indent=1))
        tok = _train_tokenizer(corpus, tmp / "model")
        timings["corpus_and_tokenizer_s"] = time.perf_counter() - t0
        _stage_done(tmp, "tokenizer", True)
        _stage_done(tmp, "timings", timings)

    if "model" in done:
        final_loss = float(done["model"]["final_train_loss"])
    else:
        t = time.perf_counter()
        final_loss = _train_model(spec, tok, tmp / "model", report)
        timings["train_model_s"] = time.perf_counter() - t
        _stage_done(tmp, "model", {"final_train_loss": final_loss})
        _stage_done(tmp, "timings", timings)

    lm = load_model(str(tmp / "model"), device="cpu")
    accuracy = _write_tasks(spec, tmp, lm)

    t = time.perf_counter()
    sae_info = []
    for sae in spec.saes:
        key = f"sae {sae.name}"
        if key not in _stages(tmp):
            _stage_done(tmp, key, _train_sae(lm, corpus, sae, tmp / "saes" / sae.name, spec, report))
        sae_info.append(_stages(tmp)[key])
    timings["train_saes_s"] = timings.get("train_saes_s", 0.0) + time.perf_counter() - t
    timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")

    manifest = {
        "name": spec.name, "fingerprint": spec.fingerprint(), "spec": spec.model_dump(mode="json"),
        "corpus": {"documents": len(corpus), "tokens": int(sum(len(x) for x in tok(corpus)["input_ids"]))},
        "model": {"d_vocab": len(tok), "n_params": int(sum(p.numel() for p in lm.model.parameters())),
                  "final_train_loss": final_loss},
        "task_accuracy": accuracy, "tasks_format": TASKS_FORMAT, "saes": sae_info, "timings": timings,
        "threads": torch.get_num_threads(),
    }
    (tmp / _STAGES_FILE).unlink()
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return manifest


def _write_tasks(spec: ZooSpec, root: Path, lm: LoadedModel) -> dict[str, float]:
    """Write the task files into ``root/tasks`` (replacing any) and return the model's top-1 accuracy on each."""
    from autoexplain.tools.data import load_task_file, tokenize_task

    tmp = root / f"tasks.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    accuracy: dict[str, float] = {}
    for i, task in enumerate(TASKS):
        path = tmp / f"{task}.json"
        path.write_text(json.dumps(task_prompts(task, spec.seed + 1000 + i, spec.task_prompts), indent=1))
        accuracy[task] = task_accuracy(lm, tokenize_task(load_task_file(path), lm.tokenizer, n_ctx=lm.n_ctx))
    shutil.rmtree(root / "tasks", ignore_errors=True)
    tmp.rename(root / "tasks")
    return accuracy


def _refresh_tasks(spec: ZooSpec, root: Path) -> None:
    """Bring an existing build's task files up to :data:`TASKS_FORMAT` without retraining anything."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["task_accuracy"] = _write_tasks(spec, root, load_model(str(root / "model"), device="cpu"))
    manifest["tasks_format"] = TASKS_FORMAT
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / "manifest.json")


def _train_tokenizer(corpus: list[str], out: Path) -> Any:
    """Byte-level BPE (GPT-2 style) trained until every corpus word is one token (with its leading space)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]  # lazily exported: stubs miss it

    bpe = ByteLevelBPETokenizer()
    # every category word appears in the training text, so even a small corpus yields one token per word
    lexicon = [" " + " ".join(words) for words in CATEGORIES.values()] * 4
    bpe.train_from_iterator(corpus + lexicon, vocab_size=4096, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(out))
    tok = GPT2TokenizerFast.from_pretrained(str(out))
    tok.pad_token = tok.eos_token
    tok.model_max_length = 10_000
    tok.save_pretrained(str(out))
    for words in CATEGORIES.values():
        for w in words:
            if len(tok.tokenize(" " + w)) != 1:
                raise RuntimeError(f"toy tokenizer split {w!r}; the zoo recipe is broken")
    return tok


def _train_model(spec: ZooSpec, tok: Any, out: Path, report: Progress) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    from autoexplain.tools.data import tokenize_windows

    torch.manual_seed(spec.seed)
    # n_ctx: accepted and saved at runtime (TransformerLens reads it), though the typed signature omits it
    cfg = GPT2Config(vocab_size=len(tok), n_positions=spec.n_ctx, n_ctx=spec.n_ctx, n_embd=spec.d_model,  # type: ignore[call-arg]
                     n_layer=spec.n_layers, n_head=spec.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, spec.train_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / spec.train_steps))
    rng = random.Random(spec.seed + 1)
    # fresh documents each step: the corpus generator is the training distribution (no epochs to overfit)
    docs_per_step = max(8, spec.batch_size * spec.n_ctx // 12)
    loss_ema = 0.0
    for step in range(spec.train_steps):
        docs = [_document(rng) for _ in range(docs_per_step)]
        win = tokenize_windows(docs, tok, ctx=spec.n_ctx, n_ctx=spec.n_ctx)
        batch = win.tokens[: spec.batch_size]
        labels = batch.masked_fill(~win.valid[: spec.batch_size], -100)
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if step == 0 else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 20 == 0 or step == spec.train_steps - 1:
            report(f"train model (loss {loss_ema:.3f})", step + 1, spec.train_steps)
    model.eval()
    model.save_pretrained(str(out))
    return round(loss_ema, 4)


def task_accuracy(lm: LoadedModel, task: TokenizedTask) -> float:
    """Top-1 accuracy: the share of prompts whose most likely next token is one of the prompt's answers."""
    with torch.no_grad():
        logits = lm.model(task.clean.to(lm.device))
    idx = torch.arange(len(task.answer_pos))
    top = logits[idx, task.answer_pos].argmax(-1).cpu()
    hits = (task.answers == top[:, None]).any(-1)
    return round(float(hits.float().mean()), 4)


def _train_sae(lm: LoadedModel, corpus: list[str], sae_spec: SAESpec, out: Path, spec: ZooSpec,
               report: Progress) -> dict[str, Any]:
    """Train a TopK SAE with sae-lens' SAETrainer on activations of ``sae_spec.site`` over the corpus."""
    from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from autoexplain.tools.data import tokenize_windows
    from autoexplain.tools.vocab import Site

    site = Site.parse(sae_spec.site)
    hook = hook_name(site)
    win = tokenize_windows(corpus, lm.tokenizer, ctx=lm.n_ctx, n_ctx=lm.n_ctx)
    acts = []
    with torch.no_grad():
        for i in range(0, len(win.tokens), 64):
            _, cache = lm.model.run_with_cache(win.tokens[i : i + 64], names_filter=hook,
                                               stop_at_layer=site.layer + 1)
            a = cache[hook]
            # skip BOS (position 0, an outlier norm in every model) and padding
            keep = win.valid[i : i + 64].clone()
            keep[:, 0] = False
            acts.append(a[keep])
    data = torch.cat(acts)
    gen = torch.Generator().manual_seed(spec.seed)
    batch = 1024

    def provider() -> Iterator[torch.Tensor]:
        while True:
            perm = torch.randperm(len(data), generator=gen)
            for j in range(0, len(perm) - batch + 1, batch):
                yield data[perm[j : j + batch]]

    torch.manual_seed(spec.seed)
    cfg = TopKTrainingSAEConfig(d_in=lm.d_model, d_sae=sae_spec.d_sae, k=sae_spec.k)
    sae = TopKTrainingSAE(cfg)
    sae.cfg.metadata.hook_name = hook
    # a name that does not depend on where the cache lives, so the SAE's content hash (its sae_id) is stable
    sae.cfg.metadata.model_name = f"toy:{spec.name}@{spec.fingerprint()}"
    trainer = SAETrainer(
        cfg=SAETrainerConfig(total_training_samples=sae_spec.samples, train_batch_size_samples=batch, lr=3e-3,
                             lr_end=3e-4, lr_decay_steps=sae_spec.samples // batch // 3, device="cpu",
                             logger=LoggingConfig(log_to_wandb=False)),
        sae=sae, data_provider=provider())
    report(f"train SAE {sae_spec.name} on {sae_spec.site}", 0, 1)
    sae = trainer.fit()
    sae.save_inference_model(str(out))
    with torch.no_grad():
        x = data[:4096]
        x_hat = sae.decode(sae.encode(x))
        fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        l0 = float((sae.encode(x) > 0).float().sum(-1).mean())
    report(f"train SAE {sae_spec.name} on {sae_spec.site}", 1, 1)
    return {"name": sae_spec.name, "site": sae_spec.site, "hook_name": hook, "d_sae": sae_spec.d_sae,
            "k": sae_spec.k, "train_samples": sae_spec.samples, "activations": len(data),
            "fvu": round(fvu, 4), "l0": round(l0, 2)}

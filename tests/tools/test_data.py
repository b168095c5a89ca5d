"""Text datasets, token windows and circuit task files, on the tiny GPT-2's real tokenizer (no mocks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from autoexplain.tools.data import (
    TaskFile,
    TaskPrompt,
    load_task_file,
    load_texts,
    tokenize_task,
    tokenize_windows,
)
from autoexplain.tools.errors import InputError

TEXTS = [
    "the cat sat on the mat",
    " and the dog ran to the park .",
    "Mary and John went to the store , John gave a drink to Mary .",
    "red green blue fox owl",
    "10 11 12 13 14 15 16 17 18 19 20",
]


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir: Path):
    """The tiny model's tokenizer, loaded the way models.py loads it (no model needed for most tests)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))


def ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def one_line_error(exc_info: pytest.ExceptionInfo[InputError], *needles: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path))
    return path


# ============================================================================= load_texts
def test_txt_jsonl_parquet_give_same_texts(tmp_path: Path) -> None:
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(TEXTS[:2]) + "\n\n   \n" + "\n".join(TEXTS[2:]) + "\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    parquet = write_parquet(tmp_path / "d.parquet", {"text": TEXTS, "id": list(range(len(TEXTS)))})
    for spec in (txt, jsonl, parquet):
        assert load_texts(str(spec)) == TEXTS, spec
        assert load_texts(str(spec), limit=2) == TEXTS[:2]


def test_text_column_and_blank_rows(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"body": "  "}, {"body": "a cat"}, {"body": ""}])
    assert load_texts(str(jsonl), text_column="body") == ["a cat"]
    # a malformed line after the limit is never read
    bad_tail = tmp_path / "tail.jsonl"
    bad_tail.write_text('{"text": "one"}\n{oops\n', encoding="utf-8")
    assert load_texts(str(bad_tail), limit=1) == ["one"]


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "missing.parquet", "sub/dir/missing"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    spec = str(tmp_path / name)
    with pytest.raises(InputError) as e:
        load_texts(spec)
    one_line_error(e, spec, "does not exist")


def test_unsupported_extension_and_directory(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(InputError) as e:
        load_texts(str(csv))
    one_line_error(e, str(csv), "unsupported extension", ".jsonl")
    with pytest.raises(InputError) as e:
        load_texts(str(tmp_path))
    one_line_error(e, str(tmp_path), "directory")


def test_jsonl_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(InputError) as e:
        load_texts(str(bad))
    one_line_error(e, str(bad), "line 3", "not valid JSON")

    no_col = write_jsonl(tmp_path / "nocol.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(InputError) as e:
        load_texts(str(no_col))
    one_line_error(e, str(no_col), "'text'", "body, id")

    not_str = write_jsonl(tmp_path / "num.jsonl", [{"text": "fine"}, {"text": 5}])
    with pytest.raises(InputError) as e:
        load_texts(str(not_str))
    one_line_error(e, str(not_str), "line 2", "int", "non-string")

    not_obj = write_jsonl(tmp_path / "list.jsonl", [["text"]])
    with pytest.raises(InputError) as e:
        load_texts(str(not_obj))
    one_line_error(e, str(not_obj), "line 1", "not an object")


def test_parquet_errors(tmp_path: Path) -> None:
    no_col = write_parquet(tmp_path / "nocol.parquet", {"body": ["x"], "n": [1]})
    with pytest.raises(InputError) as e:
        load_texts(str(no_col))
    one_line_error(e, str(no_col), "'text'", "body, n")

    nulls = write_parquet(tmp_path / "null.parquet", {"text": ["a", None]})
    with pytest.raises(InputError) as e:
        load_texts(str(nulls))
    one_line_error(e, str(nulls), "row 1", "null")

    ints = write_parquet(tmp_path / "int.parquet", {"text": [1, 2]})
    with pytest.raises(InputError) as e:
        load_texts(str(ints))
    one_line_error(e, str(ints), "row 0", "non-string")

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(InputError) as e:
        load_texts(str(garbage))
    one_line_error(e, str(garbage), "parquet")


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_empty_dataset(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"empty.{fmt}"
    if fmt == "txt":
        path.write_text("\n  \n\n", encoding="utf-8")
    elif fmt == "jsonl":
        write_jsonl(path, [{"text": ""}, {"text": "   "}])
    else:
        write_parquet(path, {"text": ["", " "]})
    with pytest.raises(InputError) as e:
        load_texts(str(path))
    one_line_error(e, f"dataset {str(path)!r} is empty")


def test_hub_name_offline_refused_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(InputError) as e:
        load_texts("someone/some-dataset-that-is-not-cached")
    assert time.monotonic() - start < 10
    one_line_error(e, "someone/some-dataset-that-is-not-cached", "hub could not be reached", ".jsonl")
    with pytest.raises(InputError) as e:  # with a limit the dataset is streamed: same refusal
        load_texts("someone/other", limit=5)
    one_line_error(e, "someone/other", "hub could not be reached")
    assert time.monotonic() - start < 10


def test_bad_limit() -> None:
    with pytest.raises(InputError):
        load_texts("x.txt", limit=0)


# ============================================================================= tokenize_windows
def expected_stream(tok, texts: list[str]) -> list[int]:
    sep = tok.eos_token_id
    out: list[int] = []
    for i, t in enumerate(texts):
        if i:
            out.append(sep)
        out.extend(ids(tok, t))
    return out


@pytest.mark.parametrize("ctx", [2, 5, 8, 32])
def test_windows_with_bos_preserve_the_stream(tok, ctx: int) -> None:
    w = tokenize_windows(TEXTS, tok, ctx=ctx, n_ctx=32)
    assert w.tokens.dtype == torch.long and w.valid.dtype == torch.bool
    assert w.tokens.shape == w.valid.shape and w.tokens.shape[1] == ctx == w.ctx
    assert w.bos and w.n_texts == len(TEXTS)
    assert (w.tokens[:, 0] == tok.bos_token_id).all() and w.valid[:, 0].all()
    # valid tokens minus the BOS column, in order, are exactly the separated stream
    body = w.tokens[:, 1:][w.valid[:, 1:]].tolist()
    stream = expected_stream(tok, TEXTS)
    assert body == stream
    assert w.n_tokens == len(stream) + w.n_windows
    # padding only at the end of the last window, and filled with the pad id
    assert w.valid[:-1].all()
    assert (w.tokens[~w.valid] == tok.pad_token_id).all()
    # right padding: no valid token after an invalid one
    last = w.valid[-1].tolist()
    assert last == sorted(last, reverse=True)


def test_windows_without_bos(tok) -> None:
    w = tokenize_windows(TEXTS, tok, ctx=7, n_ctx=32, prepend_bos=False)
    assert not w.bos and w.tokens.shape[1] == 7
    assert w.tokens[w.valid].tolist() == expected_stream(tok, TEXTS)
    assert w.tokens[0, :7].tolist() == expected_stream(tok, TEXTS)[:7]


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 8, 9, 15, 16, 17, 40])
def test_max_tokens_respected(tok, max_tokens: int) -> None:
    ctx = 8
    if max_tokens == 1:  # one valid token would be a window of nothing but BOS
        with pytest.raises(InputError) as e:
            tokenize_windows(TEXTS, tok, ctx=ctx, n_ctx=32, max_tokens=max_tokens)
        one_line_error(e, "max_tokens")
        return
    w = tokenize_windows(TEXTS, tok, ctx=ctx, n_ctx=32, max_tokens=max_tokens)
    # fills max_tokens exactly, except that a last window with room for nothing but BOS is dropped
    assert w.n_tokens == (max_tokens - 1 if max_tokens % ctx == 1 else max_tokens)
    assert w.tokens[:, 1:][w.valid[:, 1:]].tolist() == expected_stream(tok, TEXTS)[: w.n_tokens - w.n_windows]
    w2 = tokenize_windows(TEXTS, tok, ctx=ctx, n_ctx=32, max_tokens=max_tokens, prepend_bos=False)
    assert w2.n_tokens == max_tokens


def test_max_tokens_counts_texts_used_and_stops_early(tok) -> None:
    many = TEXTS * 500  # 2500 texts: only the first batch should be tokenised
    first = len(ids(tok, TEXTS[0]))
    w = tokenize_windows(many, tok, ctx=32, n_ctx=32, max_tokens=first + 1)  # BOS + the first text
    assert w.n_windows == 1 and w.n_texts == 1 and w.n_tokens == first + 1
    big = tokenize_windows(many, tok, ctx=32, n_ctx=32, max_tokens=10**9)
    assert big.n_texts == len(many)


def test_window_arguments_refused(tok) -> None:
    with pytest.raises(InputError) as e:
        tokenize_windows(TEXTS, tok, ctx=33, n_ctx=32)
    one_line_error(e, "33", "context of 32", "at most 32")
    with pytest.raises(InputError):
        tokenize_windows(TEXTS, tok, ctx=1, n_ctx=32)
    with pytest.raises(InputError) as e:
        tokenize_windows([], tok, ctx=8, n_ctx=32)
    one_line_error(e, "no texts")
    with pytest.raises(InputError):
        tokenize_windows(TEXTS, tok, ctx=8, n_ctx=32, max_tokens=0)
    with pytest.raises(InputError):
        tokenize_windows([""], tok, ctx=8, n_ctx=32)


def test_windows_run_through_the_model(tiny_model) -> None:
    w = tokenize_windows(TEXTS, tiny_model.tokenizer, ctx=tiny_model.n_ctx, n_ctx=tiny_model.n_ctx)
    with torch.no_grad():
        logits = tiny_model.model(w.tokens.to(tiny_model.device))
    assert logits.shape[:2] == w.tokens.shape


# ============================================================================= task files
IOI = [
    {"clean": "Mary and John went to the store , John gave a drink to",
     "corrupt": "John and Mary went to the store , Mary gave a drink to",
     "answers": [" Mary"], "wrong_answers": [" John"]},
    {"clean": "the cat sat on the", "corrupt": "the dog sat on the", "answers": [" mat", " park"]},
]


def write_task(tmp_path: Path, prompts: object, filename: str = "task.json", **extra: object) -> Path:
    path = tmp_path / filename
    path.write_text(json.dumps({"prompts": prompts, **extra}), encoding="utf-8")
    return path


def test_task_file_tokenises(tmp_path: Path, tiny_model) -> None:
    tok = tiny_model.tokenizer
    task = load_task_file(write_task(tmp_path, IOI, name="ioi-mini", source="auto-circuit"))
    assert task.name == "ioi-mini" and len(task.prompts) == 2 and task.prompts[1].wrong_answers == []
    tt = tokenize_task(task, tok, n_ctx=tiny_model.n_ctx)
    lens = [1 + len(ids(tok, p["clean"])) for p in IOI]
    assert lens[0] != lens[1]  # exercises right padding
    assert tt.clean.shape == tt.corrupt.shape == (2, max(lens))
    assert tt.seq_lens.tolist() == lens and tt.answer_pos.tolist() == [n - 1 for n in lens]
    assert tt.answers.tolist() == [[ids(tok, " Mary")[0], -1], [ids(tok, " mat")[0], ids(tok, " park")[0]]]
    assert tt.wrong.tolist() == [[ids(tok, " John")[0]], [-1]]
    assert tt.prompts is task and tt.n_prompts == 2
    # rows match the model's own to_tokens (BOS + text), padding after answer_pos
    for i, p in enumerate(IOI):
        n = lens[i]
        assert tt.clean[i, :n].tolist() == tiny_model.to_tokens(p["clean"])[0].tolist()
        assert tt.corrupt[i, :n].tolist() == tiny_model.to_tokens(p["corrupt"])[0].tolist()
        assert (tt.clean[i, n:] == tok.pad_token_id).all()
    # right padding leaves the logits at answer_pos unchanged (causal model)
    with torch.no_grad():
        batched = tiny_model.model(tt.clean)
        alone = tiny_model.model(tt.clean[1:, : lens[1]])
    torch.testing.assert_close(batched[1, tt.answer_pos[1]], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_task_without_bos(tmp_path: Path, tok) -> None:
    tt = tokenize_task(load_task_file(write_task(tmp_path, IOI)), tok, n_ctx=32, prepend_bos=False)
    assert tt.clean[0, : tt.seq_lens[0]].tolist() == ids(tok, IOI[0]["clean"]) and not tt.bos


def test_multi_token_answer_refused(tok) -> None:
    assert len(ids(tok, " elephant")) > 1
    task = TaskFile(prompts=[TaskPrompt(**IOI[0]), TaskPrompt(clean="the cat sat on the", corrupt="the dog sat on "
                                                                 "the", answers=[" mat"], wrong_answers=[" elephant"])])
    with pytest.raises(InputError) as e:
        tokenize_task(task, tok, n_ctx=32)
    msg = one_line_error(e, "prompt 1", "' elephant'", "single-token")
    assert f"{len(ids(tok, ' elephant'))} tokens" in msg
    # leading space matters: "Mary" is one token here too, but the check is on the exact string
    multi = TaskFile(prompts=[TaskPrompt(clean="the cat", corrupt="the dog", answers=["Mary and"])])
    with pytest.raises(InputError) as e:
        tokenize_task(multi, tok, n_ctx=32)
    one_line_error(e, "prompt 0", "'Mary and'", "2 tokens")


def test_unequal_lengths_refused(tok) -> None:
    task = TaskFile(prompts=[TaskPrompt(clean="the cat sat", corrupt="the cat sat on the mat", answers=[" on"])])
    with pytest.raises(InputError) as e:
        tokenize_task(task, tok, n_ctx=32)
    one_line_error(e, "prompt 0", "3 tokens", "6", "same length")


def test_prompt_longer_than_context_refused(tok) -> None:
    long = " ".join(["the cat sat on the mat"] * 6)
    task = TaskFile(prompts=[TaskPrompt(clean=long, corrupt=long, answers=[" cat"])])
    with pytest.raises(InputError) as e:
        tokenize_task(task, tok, n_ctx=32)
    one_line_error(e, "prompt 0", "context is 32")


def test_task_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(InputError) as e:
        load_task_file(missing)
    one_line_error(e, str(missing), "does not exist")

    broken = tmp_path / "broken.json"
    broken.write_text('{"prompts": [', encoding="utf-8")
    with pytest.raises(InputError) as e:
        load_task_file(broken)
    one_line_error(e, str(broken), "not valid JSON")

    top_list = tmp_path / "list.json"
    top_list.write_text("[]", encoding="utf-8")
    with pytest.raises(InputError) as e:
        load_task_file(top_list)
    one_line_error(e, str(top_list), "prompts")


@pytest.mark.parametrize(("prompts", "field", "expected"), [
    ([], "prompts", "non-empty list"),
    ([IOI[0], IOI[1], IOI[0], {**IOI[0], "answers": []}], "prompts[3].answers", "non-empty list"),
    ([{**IOI[0], "answers": " Mary"}], "prompts[0].answers", "list"),
    ([{**IOI[0], "answers": [" Mary", 3]}], "prompts[0].answers[1]", "string"),
    ([{k: v for k, v in IOI[0].items() if k != "corrupt"}], "prompts[0].corrupt", "non-empty string"),
    ([{**IOI[0], "clean": ""}], "prompts[0].clean", "non-empty string"),
    ([IOI[0], "just a string"], "prompts[1]", "object"),
])
def test_schema_error_names_the_field(tmp_path: Path, prompts: list, field: str, expected: str) -> None:
    path = write_task(tmp_path, prompts)
    with pytest.raises(InputError) as e:
        load_task_file(path)
    one_line_error(e, str(path), f"{field} is invalid", expected)


@pytest.mark.parametrize("batch_windows", [1, 3, 7])
@pytest.mark.parametrize("max_tokens", [None, 50, 97])
def test_streamed_windows_equal_tokenize_windows(tiny_model, tmp_path, batch_windows, max_tokens) -> None:
    from autoexplain.tools.data import iter_texts, iter_windows

    path = tmp_path / "d.txt"
    path.write_text("\n".join(TEXTS * 5) + "\n\n")
    whole = tokenize_windows(load_texts(str(path)), tiny_model.tokenizer, ctx=8, n_ctx=32, max_tokens=max_tokens)
    parts = list(iter_windows(iter_texts(str(path)), tiny_model.tokenizer, ctx=8, n_ctx=32,
                              batch_windows=batch_windows, max_tokens=max_tokens))
    assert all(p.n_windows <= batch_windows for p in parts)
    assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
    assert torch.equal(torch.cat([p.valid for p in parts]), whole.valid)
    assert sum(p.n_texts for p in parts) == whole.n_texts


def test_iter_texts_empty_dataset(tmp_path) -> None:
    from autoexplain.tools.data import iter_texts

    path = tmp_path / "blank.txt"
    path.write_text("\n  \n")
    with pytest.raises(InputError, match="is empty"):
        list(iter_texts(str(path)))


# ============================================================================= long lines, folders, spec checks
class RecordingTokenizer:
    """The real tokenizer, recording the length of every text it is asked to tokenise (nothing else changes)."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.lengths: list[int] = []

    def __call__(self, texts, **kwargs):
        self.lengths += [len(t) for t in texts]
        return self._tok(texts, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


def _long_line(n_words: int) -> str:
    words = ["cat", "sat", "on", "the", "mat", "and", "Mary", "gave", "John", "a", "drink", "10", "12,", "."]
    return " ".join(words[(i * 7) % len(words)] for i in range(n_words))


def test_a_long_line_is_tokenised_in_bounded_pieces_with_the_same_windows(tok, tmp_path: Path) -> None:
    from autoexplain.tools import data
    from autoexplain.tools.data import iter_texts, iter_windows

    line = _long_line(60_000)  # ~230,000 characters on one line
    assert len(line) > 4 * data._PIECE_CHARS
    path = tmp_path / "one-line.txt"
    path.write_text("short first text\n" + line + "\nlast text\n", encoding="utf-8")
    texts = ["short first text", line, "last text"]
    whole = expected_stream(tok, texts)  # the reference: every text tokenised whole

    rec = RecordingTokenizer(tok)
    w = tokenize_windows(load_texts(str(path)), rec, ctx=32, n_ctx=32)
    assert max(rec.lengths) <= data._PIECE_CHARS  # never the whole line
    assert w.tokens[:, 1:][w.valid[:, 1:]].tolist() == whole
    assert w.n_texts == 3

    # with a budget, reading stops once it is met: only the pieces the budget needs are tokenised
    rec = RecordingTokenizer(tok)
    parts = list(iter_windows(iter_texts(str(path)), rec, ctx=32, n_ctx=32, batch_windows=8, max_tokens=5_000))
    assert sum(p.n_tokens for p in parts) == 5_000
    assert sum(rec.lengths) < 2 * data._PIECE_CHARS + 100
    body = torch.cat([p.tokens[:, 1:][p.valid[:, 1:]] for p in parts]).tolist()
    assert body == whole[: len(body)]


def test_a_long_line_without_spaces_is_cut_at_the_limit(tok) -> None:
    from autoexplain.tools import data

    blob = "ab" * (data._PIECE_CHARS + 10)  # no space anywhere: hard cuts
    rec = RecordingTokenizer(tok)
    w = tokenize_windows([blob], rec, ctx=32, n_ctx=32, max_tokens=3_000)
    assert max(rec.lengths) <= data._PIECE_CHARS and w.n_tokens == 3_000
    pieces = list(data._pieces(blob, data._PIECE_CHARS))
    assert "".join(pieces) == blob and all(len(p) <= data._PIECE_CHARS for p in pieces)


def test_pieces_cut_before_a_word_and_rejoin() -> None:
    from autoexplain.tools.data import _pieces

    text = _long_line(3_000)
    pieces = list(_pieces(text, 1_000))
    assert "".join(pieces) == text and all(len(p) <= 1_000 for p in pieces)
    for p in pieces[1:]:
        assert p[0] == " " and p[1].isalnum()
    assert list(_pieces("short", 1_000)) == ["short"]


def test_a_folder_of_files_is_one_dataset_in_sorted_order(tmp_path: Path) -> None:
    from autoexplain.tools.data import dataset_identity, iter_texts

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee one\nbee two\n")
    (folder / "a.txt").write_text("ay one\n")
    write_jsonl(folder / "sub" / "c.jsonl", [{"text": "sea one"}])
    write_parquet(folder / "d.parquet", {"text": ["dee one"]})
    (folder / "notes.md").write_text("ignored\n")
    (folder / ".hidden.txt").write_text("ignored too\n")
    expected = ["ay one", "bee one", "bee two", "dee one", "sea one"]  # a.txt, b.txt, d.parquet, sub/c.jsonl
    assert load_texts(str(folder)) == expected
    assert list(iter_texts(str(folder))) == expected

    ident = dataset_identity(str(folder))
    assert [f[0] for f in ident["files"]] == ["a.txt", "b.txt", "d.parquet", "sub/c.jsonl"]
    assert json.loads(json.dumps(ident)) == dataset_identity(str(folder))  # stable through a JSON round trip
    (folder / "e.txt").write_text("new file\n")
    assert dataset_identity(str(folder)) != ident  # a file added changes the identity (harvest reuse notices)
    (folder / "e.txt").unlink()
    assert dataset_identity(str(folder)) == ident
    (folder / "a.txt").write_text("ay one, edited\n")
    assert dataset_identity(str(folder)) != ident


def test_a_folder_with_a_broken_file_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("fine\n")
    (folder / "b.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InputError) as e:
        load_texts(str(folder))
    one_line_error(e, "b.jsonl", "line 2")


def test_check_dataset_spec(tmp_path: Path) -> None:
    from autoexplain.tools.data import check_dataset_spec

    good = tmp_path / "d.txt"
    good.write_text("\n\nhello\n")
    check_dataset_spec(str(good))
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "x.txt").write_text("hi\n")
    check_dataset_spec(str(folder))
    check_dataset_spec("owner/some-dataset@main")  # hub syntax only: the hub is not contacted
    check_dataset_spec("wikitext")
    (tmp_path / "blank.txt").write_text("\n   \n")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "x.csv").write_text("text\nhi\n")
    cases = [(str(tmp_path / "missing.txt"), "does not exist"), (str(tmp_path / "nope" / "x"), "does not exist"),
             ("", "empty dataset spec"), ("has spaces in it", "neither a local file"),
             (str(tmp_path / "blank.txt"), "is empty"), (str(tmp_path / "empty-dir"), "holds no"),
             (str(tmp_path / "x.csv"), "unsupported extension")]
    for spec, needle in cases:
        with pytest.raises(InputError) as e:
            check_dataset_spec(spec)
        one_line_error(e, needle)

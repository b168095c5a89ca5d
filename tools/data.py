"""Load the data the tools run on: text datasets cut into token windows, and circuit task files.

Text datasets
-------------
:func:`load_texts` reads a local ``.txt`` (one text per line), ``.jsonl`` (one JSON object per line) or
``.parquet`` file, a folder of such files (read in sorted order of their relative paths, subfolders included;
other files and hidden ones are ignored), or a Hugging Face hub dataset by name. :func:`check_dataset_spec`
checks a spec cheaply (no hub access, no model) so a command can refuse a bad one before loading weights.
:func:`tokenize_windows` turns the texts into fixed-size token windows (the BOS and packing policy is documented
there; it is the one the docs describe). Long texts are tokenised in bounded pieces (:func:`_pieces`), so
memory does not grow with line length.

Circuit task files
------------------
The layout is auto-circuit's, so its task files load unchanged::

    {"name": "ioi",                        # optional
     "prompts": [{"clean": "...", "corrupt": "...", "answers": [" Mary"], "wrong_answers": [" John"]}, ...]}

:func:`load_task_file` validates the file against :class:`TaskFile`; :func:`tokenize_task` checks what only a
tokenizer can check (single-token answers, equal clean/corrupt lengths, fitting the context) and returns padded
tensors with the position each prompt predicts from.

Every mistake a user can make raises :class:`~autoexplain.tools.errors.InputError` with one line naming the file
(and line, row or prompt) and the fix. Heavy libraries (``datasets``, ``pyarrow``) are imported inside the
functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoexplain.tools.errors import InputError

#: Local file formats :func:`load_texts` reads, by (lower-case) suffix.
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")
_FORMATS = ".txt, .jsonl or .parquet"

#: How many texts are handed to the tokenizer per call: large enough for the fast tokenizer's batching to pay,
#: small enough that ``max_tokens`` stops the work early on a big dataset.
_TOKENIZE_BATCH = 256
#: Texts longer than this (characters) are tokenised in pieces of at most this many characters, cut before a
#: space (see :func:`_pieces`): the tokenizer's memory is bounded whatever the line length.
_PIECE_CHARS = 50_000
#: A tokenizer call is made once this many characters are batched, even with fewer than ``_TOKENIZE_BATCH`` texts.
_TOKENIZE_CHARS = 1_000_000

_MISSING = object()  # a row without the text column (distinct from a null value)


# ============================================================================= text datasets
def load_texts(spec: str, *, limit: int | None = None, text_column: str = "text") -> list[str]:
    """Read the texts of ``spec``: a ``.txt``, ``.jsonl`` or ``.parquet`` file, a folder of them, or a hub dataset
    name.

    * ``.txt``: one text per line (the line break is dropped, other whitespace kept).
    * ``.jsonl``: one JSON object per line; the text is its ``text_column`` key.
    * ``.parquet``: the ``text_column`` column, read with pyarrow one batch at a time.
    * a folder: every ``.txt`` / ``.jsonl`` / ``.parquet`` file in it (subfolders included, hidden ones and other
      extensions skipped), one after the other in sorted order of their relative paths, each read as above.
    * anything else that is not a path: ``datasets.load_dataset(spec, split="train")``. With ``limit`` the
      dataset is streamed, so only the rows needed are fetched instead of the whole split.

    Blank texts (empty or whitespace only) are skipped in every format: they would add nothing but separators.
    ``limit`` caps the number of texts returned (reading stops there, so a malformed line after the limit
    goes unnoticed). A dataset with no non-blank text is an error, not an empty list, because every caller
    would fail later with a less helpful message.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer, got {limit!r}: pass limit=None to read every text")
    rows, source = _rows_of(spec, text_column, streaming=limit is not None)
    return _gather(rows, source=source, limit=limit, column=text_column)


def iter_texts(spec: str, *, text_column: str = "text") -> Generator[str, None, None]:
    """Stream the non-blank texts of ``spec`` (same formats and checks as :func:`load_texts`), one at a time.

    Memory stays flat whatever the dataset's size: what a harvest over millions of tokens reads from.
    Hub datasets are streamed. An empty dataset raises :class:`InputError` once the stream ends.
    """
    rows, source = _rows_of(spec.strip() if isinstance(spec, str) else spec, text_column, streaming=True)
    seen = False
    try:
        for where, value in rows:
            _check_text(value, where, source=source, column=text_column)
            if value.strip():
                seen = True
                yield value
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    if not seen:
        raise InputError(f"{source.replace('dataset file', 'dataset')} is empty: it has no non-blank text in "
                         f"column {text_column!r}; pass a dataset with at least one text")


def _rows_of(spec: str, text_column: str, *, streaming: bool) -> tuple[Iterator[tuple[str, Any]], str]:
    """The ``(where, value)`` rows of a dataset spec and how to name it in messages; validates the spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("empty dataset spec: pass a .txt, .jsonl or .parquet file or a Hugging Face dataset name")
    spec = spec.strip()
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.exists():
        if path.is_dir():
            files = _folder_files(path, spec)
            return _folder_rows(path, files, text_column), f"dataset directory {spec!r}"
        if suffix not in TEXT_SUFFIXES:
            raise InputError(f"dataset file {spec!r} has an unsupported extension {path.suffix or '(none)'!r}: "
                             f"convert it to {_FORMATS}")
        readers = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".parquet": _parquet_rows}
        return readers[suffix](path, text_column), f"dataset file {spec!r}"
    if suffix in TEXT_SUFFIXES or _looks_like_path(spec):
        raise InputError(f"dataset file {spec!r} does not exist: check the path (relative paths start from "
                         f"{os.getcwd()!r})")
    return _hub_rows(spec, text_column, streaming=streaming), f"dataset {spec!r}"


def _dataset_files(path: Path) -> list[Path]:
    """The dataset files of a folder: ``.txt`` / ``.jsonl`` / ``.parquet`` files at any depth, sorted by their
    relative path (so the order, and the windows, are the same on every machine); hidden files and folders
    (``.name``) are skipped, other extensions ignored."""
    return sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                  key=lambda p: p.relative_to(path).as_posix())


def _folder_files(path: Path, spec: str) -> list[Path]:
    """:func:`_dataset_files`; a folder without any is an error."""
    files = _dataset_files(path)
    if not files:
        raise InputError(f"dataset directory {spec!r} holds no {_FORMATS} file: put the texts in such files "
                         "(one text per line for .txt) or pass a file")
    return files


def _folder_rows(path: Path, files: Sequence[Path], column: str) -> Iterator[tuple[str, Any]]:
    """The rows of every file of a folder dataset in order; ``where`` names the file."""
    readers = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".parquet": _parquet_rows}
    for f in files:
        rows = readers[f.suffix.lower()](f, column)
        try:
            for where, value in rows:
                yield f"{f.relative_to(path).as_posix()} {where}", value
        finally:
            rows.close()


_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[A-Za-z0-9._/-]+)?")


def check_dataset_spec(spec: str, *, text_column: str = "text") -> None:
    """Check a dataset spec cheaply, before any model loads; raise :class:`InputError` (one line) if it is bad.

    * A local file: it exists, its extension is known, and it holds a non-blank text (read up to the first one:
      cheap for any real file; a file that is blank to its end is read once).
    * A folder: it holds at least one dataset file and a non-blank text (the first files up to the first text).
    * Anything else must look like a hub name (``name`` or ``owner/name``, optional ``@revision``); the hub is not
      contacted here (the harvest finds out whether the dataset exists), so this never waits on the network.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("empty dataset spec: pass a .txt, .jsonl or .parquet file, a folder of them, or a Hugging "
                         "Face dataset name")
    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.exists() or Path(spec).suffix.lower() in TEXT_SUFFIXES or _looks_like_path(spec):
        texts = iter_texts(spec, text_column=text_column)  # missing / empty / unknown extension: InputError
        try:
            next(texts)
        finally:
            texts.close()
        return
    if not _HUB_NAME.fullmatch(spec):
        raise InputError(f"dataset {spec!r} is neither a local file or folder nor a Hugging Face dataset name "
                         "(owner/name[@revision]): check the spelling or the path")


def _looks_like_path(spec: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything more path-like is a missing local file."""
    return (spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec.count("/") > 1
            or Path(spec).suffix.lower() in (".json", ".csv", ".tsv", ".gz", ".arrow"))


def _gather(rows: Iterable[tuple[str, Any]], *, source: str, limit: int | None, column: str) -> list[str]:
    """Collect non-blank string texts from ``(where, value)`` rows, up to ``limit``."""
    texts: list[str] = []
    try:
        _collect(rows, texts, source=source, limit=limit, column=column)
    finally:
        close = getattr(rows, "close", None)
        if close is not None:  # stop a generator early: closes its file now rather than at garbage collection
            close()
    if not texts:
        raise InputError(f"{source.replace('dataset file', 'dataset')} is empty: it has no non-blank text in "
                         f"column {column!r}; pass a dataset with at least one text")
    return texts


def _collect(rows: Iterable[tuple[str, Any]], texts: list[str], *, source: str, limit: int | None,
             column: str) -> None:
    for where, value in rows:
        _check_text(value, where, source=source, column=column)
        if value.strip():
            texts.append(value)
            if limit is not None and len(texts) >= limit:
                return


def _check_text(value: Any, where: str, *, source: str, column: str) -> None:
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise InputError(f"{source}: {where} has a non-string {column!r} value ({kind}): make every "
                         f"{column!r} value a string (or drop that row)")


def _txt_rows(path: Path, _column: str) -> Generator[tuple[str, Any], None, None]:
    try:
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                yield f"line {n}", line.rstrip("\r\n")
    except UnicodeDecodeError:
        raise InputError(f"dataset file {str(path)!r} is not UTF-8 text: re-save it as UTF-8") from None


def _jsonl_rows(path: Path, column: str) -> Generator[tuple[str, Any], None, None]:
    name = str(path)
    try:
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"dataset file {name!r}: line {n} is not valid JSON ({exc.msg}); write one "
                                     f"JSON object per line, e.g. {{\"{column}\": \"...\"}}") from None
                if not isinstance(row, dict):
                    raise InputError(f"dataset file {name!r}: line {n} is a JSON {type(row).__name__}, not an "
                                     f"object; write one JSON object per line, e.g. {{\"{column}\": \"...\"}}")
                if column not in row:
                    raise InputError(f"dataset file {name!r}: line {n} has no {column!r} column (columns found: "
                                     f"{_listing(row)}); add it or choose the text column with text_column")
                yield f"line {n}", row[column]
    except UnicodeDecodeError:
        raise InputError(f"dataset file {name!r} is not UTF-8 text: re-save it as UTF-8") from None


def _parquet_rows(path: Path, column: str) -> Generator[tuple[str, Any], None, None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    try:
        pf = pq.ParquetFile(name)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"dataset file {name!r} is not a readable parquet file ({_first_sentence(exc)}); "
                         "re-write it, e.g. with pandas.DataFrame.to_parquet") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise InputError(f"dataset file {name!r} has no {column!r} column (columns found: {_listing(names)}); "
                         "add it or choose the text column with text_column")
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield f"row {row}", value
            row += 1


def dataset_identity(spec: str) -> dict[str, Any]:
    """What names the content of dataset ``spec``, for deciding whether stored results came from it.

    A local file: its resolved path, size and modification time (a file edited or replaced since gets another
    identity; hashing the content would read gigabytes). A folder: its resolved path and, for every dataset file
    it holds (the files :func:`load_texts` reads, in order), the relative path, size and modification time — a
    file added, removed, renamed or edited changes it. A hub dataset: its name and revision (``NAME@REVISION``
    pins one; without it the revision is ``None``, i.e. whatever the default branch holds).
    """
    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.is_file():
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.is_dir():
        files = []
        for f in _dataset_files(path):
            st = f.stat()
            files.append([f.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns])
        return {"path": str(path.resolve()), "files": files}
    name, _, revision = spec.partition("@")
    return {"hub": name, "revision": revision or None}


def _hub_rows(name: str, column: str, *, streaming: bool) -> Iterator[tuple[str, Any]]:
    """Rows of a hub dataset's train split (``NAME@REVISION`` pins a revision). Offline, ``datasets`` fails at
    once with ``ConnectionError``."""
    import datasets
    from datasets.exceptions import DatasetsError

    hint = f"pass a local {_FORMATS} file instead"
    name, _, revision = name.partition("@")
    try:
        ds = datasets.load_dataset(name, split="train", streaming=streaming, revision=revision or None)
    except ConnectionError as exc:
        reason = "offline mode is on" if "offline" in str(exc).lower() else _first_sentence(exc)
        raise InputError(f"dataset {name!r} is not a local file and the Hugging Face hub could not be reached "
                         f"({reason}): {hint}") from None
    except FileNotFoundError:
        raise InputError(f"dataset {name!r} is neither a local file nor a dataset on the Hugging Face hub: "
                         f"check the name, or {hint}") from None
    except (ValueError, DatasetsError) as exc:
        raise InputError(f"could not load dataset {name!r} from the hub ({_first_sentence(exc)}): {hint}") from None
    known = getattr(ds, "column_names", None)
    if known is not None and column not in known:
        raise InputError(f"dataset {name!r} has no {column!r} column (columns found: {_listing(known)}); "
                         "choose the text column with text_column")
    for i, row in enumerate(ds):
        value = row.get(column, _MISSING)
        if value is _MISSING:
            raise InputError(f"dataset {name!r}: row {i} has no {column!r} column (columns found: "
                             f"{_listing(row)}); choose the text column with text_column")
        yield f"row {i}", value


# ----------------------------------------------------------------------------- token windows
@dataclass(frozen=True)
class TokenWindows:
    """Fixed-size token windows cut from a stream of texts (see :func:`tokenize_windows` for the policy).

    A frozen dataclass rather than a pydantic model because it carries tensors. Tensors are on the CPU;
    callers move them to the model's device.
    """

    tokens: torch.Tensor  # LongTensor [n_windows, ctx]
    valid: torch.Tensor  # BoolTensor [n_windows, ctx]; False on right padding
    ctx: int
    bos: bool  # whether every window starts with the BOS token
    n_texts: int  # texts that contributed tokens (a text cut off by max_tokens counts)

    @property
    def n_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        """Valid (non-padding) tokens, BOS tokens included."""
        return int(self.valid.sum())


def tokenize_windows(texts: Sequence[str], tokenizer: Any, *, ctx: int, n_ctx: int, prepend_bos: bool = True,
                     max_tokens: int | None = None) -> TokenWindows:
    """Pack ``texts`` into windows of ``ctx`` tokens for a model whose context is ``n_ctx``.

    Policy (BOS handling)
    ~~~~~~~~~~~~~~~~~~~~~
    1. Each text is tokenised *without* special tokens (batched calls to the tokenizer).
    2. The texts are concatenated into one stream with a separator id between consecutive texts: the EOS id,
       or the BOS id when the tokenizer has no EOS (GPT-2's single ``<|endoftext|>`` is both). So the model
       sees a document boundary the way it saw one in pre-training.
    3. With ``prepend_bos`` the stream is cut into chunks of ``ctx - 1`` tokens and every window is
       ``[BOS] + chunk``: each window looks like the start of a fresh document, as sae-lens does with
       ``prepend_bos`` when it trains and evaluates SAEs. Without it the chunks are ``ctx`` tokens and a window
       may start mid-sentence; the model then treats its first token as the start of context, so activations
       at early positions are unusual either way (position 0 is an attention sink; skip it in statistics).
    4. The last, partial chunk is right-padded with the pad id (``pad_token_id``, else EOS) and those
       positions are False in ``valid``; padding never counts as data. Padding on the right leaves a causal
       model's outputs at the real positions unchanged.
    5. ``max_tokens`` caps the number of *valid* tokens (BOS included): packing stops as soon as that many are
       collected, and tokenisation stops early too. A window that would hold nothing but BOS is dropped.

    Caveat: a text split across windows loses its earlier context in the later window; windows are a sample
    of activations, not a faithful reading of long documents.
    """
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, not one string: wrap it as [text]")
    if not texts:
        raise InputError("no texts to tokenise: pass at least one non-blank text (load_texts gives a list)")
    parts = list(iter_windows(texts, tokenizer, ctx=ctx, n_ctx=n_ctx, prepend_bos=prepend_bos,
                              max_tokens=max_tokens, batch_windows=1 << 30))
    return TokenWindows(tokens=torch.cat([p.tokens for p in parts]).contiguous(),
                        valid=torch.cat([p.valid for p in parts]).contiguous(), ctx=ctx, bos=prepend_bos,
                        n_texts=sum(p.n_texts for p in parts))


def iter_windows(texts: Iterable[str], tokenizer: Any, *, ctx: int, n_ctx: int, batch_windows: int,
                 prepend_bos: bool = True, max_tokens: int | None = None) -> Iterator[TokenWindows]:
    """Stream ``texts`` into batches of at most ``batch_windows`` windows, with the policy of
    :func:`tokenize_windows` (the two give the same windows in the same order; ``n_texts`` of a batch counts the
    texts that started in it). Memory is bounded by one tokenizer batch plus one batch of windows, so a dataset
    of any size can be streamed from :func:`iter_texts`.
    """
    _check_window_args(ctx, n_ctx, max_tokens)
    if batch_windows < 1:
        raise InputError(f"batch_windows must be at least 1, got {batch_windows}")
    bos_id = _bos_id(tokenizer) if prepend_bos else None
    sep_id = _eos_id(tokenizer)
    if sep_id is None:
        raise InputError("the tokenizer has neither an EOS nor a BOS token to separate texts: use a model "
                         "whose tokenizer defines one")
    pad_id = _pad_id(tokenizer)
    body = ctx - (1 if prepend_bos else 0)
    need = None if max_tokens is None else _content_budget(max_tokens, ctx, 1 if prepend_bos else 0)
    per_batch = body * batch_windows
    buf: list[int] = []
    started = 0  # texts that started inside ``buf`` (not yet reported in a batch)
    emitted = taken = 0
    for seq, continued in _token_seqs(texts, tokenizer):
        if need is not None and taken >= need:
            break
        if not continued:  # a new text (a piece of a long text continues the previous one: no separator)
            if taken or buf:
                buf.append(sep_id)
                taken += 1
            if need is None or taken < need:
                started += 1
        if need is not None:
            seq = seq[: max(0, need - taken)]
        buf.extend(seq)
        taken += len(seq)
        while len(buf) >= per_batch:
            yield _pack(buf[:per_batch], body, bos_id, pad_id, ctx, started)
            emitted += 1
            buf, started = buf[per_batch:], 0
    if need is not None and taken > need:  # a trailing separator past the budget
        del buf[len(buf) - (taken - need):]
    if buf:
        yield _pack(buf, body, bos_id, pad_id, ctx, started)
        emitted += 1
    if not emitted:
        detail = f"max_tokens={max_tokens} leaves no room for text" if need == 0 else "the texts tokenise to nothing"
        raise InputError(f"no tokens to pack into windows: {detail}; pass longer texts or a larger max_tokens")


def available_tokens(spec: str, tokenizer: Any, *, ctx: int, n_ctx: int, max_tokens: int,
                     batch_windows: int = 256) -> int | None:
    """Read and tokenise a local dataset up to ``max_tokens`` exactly as a harvest will, without a model; return the
    tokens its windows hold (BOS included; at most about ``max_tokens``).

    Every row the harvest will read is validated here, so a broken line fails before anything is written; a
    result far below ``max_tokens`` says the dataset is too small for the request. ``None`` for a hub dataset
    (streamed, not read twice).
    """
    if not Path(spec.strip()).expanduser().is_file():
        return None
    return sum(w.n_tokens for w in iter_windows(iter_texts(spec), tokenizer, ctx=ctx, n_ctx=n_ctx,
                                                batch_windows=batch_windows, max_tokens=max_tokens))


def _check_window_args(ctx: int, n_ctx: int, max_tokens: int | None) -> None:
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise InputError(f"window size ctx={ctx!r} is too small: pass an integer of at least 2 tokens")
    if ctx > n_ctx:
        raise InputError(f"window size ctx={ctx} exceeds the model's context of {n_ctx} tokens: pass a window "
                         f"of at most {n_ctx}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}: pass max_tokens=None "
                         "to use every token")


def _pack(stream: list[int], body: int, bos_id: int | None, pad_id: int, ctx: int, n_texts: int) -> TokenWindows:
    """Cut ``stream`` into rows of ``body`` tokens (the last right-padded), each prefixed with BOS if given."""
    length = len(stream)
    n_windows = -(-length // body)
    flat = torch.full((n_windows * body,), pad_id, dtype=torch.long)
    flat[:length] = torch.tensor(stream, dtype=torch.long)
    tokens = flat.view(n_windows, body)
    valid = (torch.arange(n_windows * body) < length).view(n_windows, body)
    if bos_id is not None:
        tokens = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), tokens], dim=1)
        valid = torch.cat([torch.ones((n_windows, 1), dtype=torch.bool), valid], dim=1)
    return TokenWindows(tokens=tokens, valid=valid, ctx=ctx, bos=bos_id is not None, n_texts=n_texts)


def _token_seqs(texts: Iterable[str], tokenizer: Any) -> Iterator[tuple[list[int], bool]]:
    """``(token ids, continued)`` for each text, or for each piece of a long one (no special tokens).

    Texts of at most :data:`_PIECE_CHARS` characters are tokenised whole, in batches of :data:`_TOKENIZE_BATCH`
    texts or :data:`_TOKENIZE_CHARS` characters, whichever fills first; ``continued`` is False. A longer text is
    cut by :func:`_pieces` and each piece tokenised on its own call, lazily: the caller stops pulling once its token
    budget is met, so a 30 MB line costs one piece of tokenizer memory and, with a budget, only the pieces the
    budget needs. Its first piece has ``continued`` False, the rest True (no separator goes between them).
    """
    batch: list[str] = []
    chars = 0
    index = 0
    for text in texts:
        if not isinstance(text, str):
            raise InputError(f"text {index} is a {type(text).__name__}, not a string: pass a list of strings")
        index += 1
        if len(text) > _PIECE_CHARS:
            if batch:
                yield from ((ids, False) for ids in _encode_batch(batch, tokenizer))
                batch, chars = [], 0
            for k, piece in enumerate(_pieces(text, _PIECE_CHARS)):
                yield _encode_batch([piece], tokenizer)[0], k > 0
            continue
        batch.append(text)
        chars += len(text)
        if len(batch) == _TOKENIZE_BATCH or chars >= _TOKENIZE_CHARS:
            yield from ((ids, False) for ids in _encode_batch(batch, tokenizer))
            batch, chars = [], 0
    if batch:
        yield from ((ids, False) for ids in _encode_batch(batch, tokenizer))


def _pieces(text: str, limit: int) -> Iterator[str]:
    """``text`` cut into consecutive pieces of at most ``limit`` characters (joined, they are ``text``).

    Each cut is placed, as late as possible within the limit (but not in its first half), *before a single
    space that follows a non-space character and precedes a letter or digit*: the start of a pre-token like
    ``" word"`` in GPT-2-style byte-level BPE (GPT-2, GPT-NeoX, Llama 3, Qwen, …), whose pre-tokenizer never lets a
    token run across such a point, so the pieces tokenise to exactly the ids of the whole text. Caveats: with no
    such point in the window the cut is made at the limit (a run of 25,000+ characters without a space, e.g.
    base64), and a tokenizer that treats the start of its input specially (SentencePiece with a dummy prefix, as
    in Llama 2) may tokenise the first word after a cut differently — one token per ``limit`` characters, only
    in texts longer than ``limit``."""
    start = 0
    n = len(text)
    while n - start > limit:
        end = start + limit
        cut = end
        lo = start + limit // 2
        i = text.rfind(" ", lo, end)
        while i > lo:
            if not text[i - 1].isspace() and i + 1 < n and text[i + 1].isalnum():
                cut = i
                break
            i = text.rfind(" ", lo, i)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode_batch(batch: list[str], tokenizer: Any) -> list[list[int]]:
    # verbose=False: long documents are expected here (we cut them), so skip the "too long" warning.
    return tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _content_budget(max_tokens: int, ctx: int, n_bos: int) -> int:
    """Stream tokens that fit in ``max_tokens`` valid tokens: full windows, plus a partial one if it holds text."""
    full, rest = divmod(max_tokens, ctx)
    return full * (ctx - n_bos) + max(0, rest - n_bos)


def _bos_id(tokenizer: Any) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise InputError("the tokenizer has no BOS (or EOS) token to start windows with: pass prepend_bos=False")
    return int(bos)


def _eos_id(tokenizer: Any) -> int | None:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    return None if eos is None else int(eos)


def _pad_id(tokenizer: Any) -> int:
    """The pad id, else EOS, else 0. Padding is always masked (``valid``, ``seq_lens``), so its value is moot."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# ============================================================================= circuit task files
NonEmptyStr = Annotated[str, Field(min_length=1)]


class TaskPrompt(BaseModel):
    """One prompt pair: the model should predict an ``answers`` token after ``clean``; ``corrupt`` is the
    same-length counterfactual used for patching. Unknown keys (other tools' metadata) are ignored."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    clean: str = Field(min_length=1)
    corrupt: str = Field(min_length=1)
    answers: list[NonEmptyStr] = Field(min_length=1)
    wrong_answers: list[NonEmptyStr] = Field(default_factory=list)


class TaskFile(BaseModel):
    """A circuit task file in auto-circuit's layout (``{"prompts": [...]}``, optional ``"name"``)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    prompts: list[TaskPrompt] = Field(min_length=1)
    name: str | None = None


#: What each field should hold, for schema error messages.
_EXPECTED: dict[str, str] = {
    "prompts": "a non-empty list of prompt objects",
    "clean": "a non-empty string",
    "corrupt": "a non-empty string",
    "answers": "a non-empty list of strings (single-token answers, e.g. [\" Mary\"])",
    "wrong_answers": "a list of strings (may be empty)",
    "name": "a string or null",
}
_EXPECTED_ITEM: dict[str, str] = {
    "prompts": "an object with clean, corrupt, answers and optional wrong_answers",
    "answers": "a non-empty string",
    "wrong_answers": "a non-empty string",
}


def load_task_file(path: str | os.PathLike[str]) -> TaskFile:
    """Read and validate a task file. Schema errors name the first offending field, e.g. ``prompts[3].answers``."""
    p = Path(path).expanduser()
    name = str(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise InputError(f"task file {name!r} {what}: pass a JSON file like "
                         "{\"prompts\": [{\"clean\": ..., \"corrupt\": ..., \"answers\": [...]}]}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"task file {name!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno}); fix the syntax") from None
    except UnicodeDecodeError:
        raise InputError(f"task file {name!r} is not UTF-8 text: re-save it as UTF-8") from None
    if not isinstance(data, dict):
        raise InputError(f"task file {name!r} holds a JSON {type(data).__name__}, not an object: wrap the "
                         "prompts as {\"prompts\": [...]}")
    try:
        return TaskFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _loc_path(err["loc"])
        field = next((str(x) for x in reversed(err["loc"]) if isinstance(x, str)), "")
        if err["loc"] and isinstance(err["loc"][-1], int):  # an item inside a list: prompts[3], answers[1]
            expected = _EXPECTED_ITEM.get(field, "a valid item")
        else:
            expected = _EXPECTED.get(field, "a valid value")
        raise InputError(f"task file {name!r}: {loc} is invalid ({err['msg'].rstrip('.')}); expected "
                         f"{expected}") from None


def _loc_path(loc: Sequence[str | int]) -> str:
    """pydantic's ``('prompts', 3, 'answers')`` as ``prompts[3].answers``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


@dataclass(frozen=True)
class TokenizedTask:
    """A task file as right-padded token tensors (CPU). Row ``i`` is ``prompts.prompts[i]``.

    ``answer_pos[i]`` is the last real position of prompt ``i`` (``seq_lens[i] - 1``): the logits there predict
    the answer. Clean and corrupt rows have the same length, so one ``answer_pos`` serves both.
    """

    clean: torch.Tensor  # LongTensor [n, seq]
    corrupt: torch.Tensor  # LongTensor [n, seq]
    answer_pos: torch.Tensor  # LongTensor [n]
    answers: torch.Tensor  # LongTensor [n, max_answers], -1 padded
    wrong: torch.Tensor  # LongTensor [n, max_wrong], -1 padded (max_wrong may be 0)
    seq_lens: torch.Tensor  # LongTensor [n], BOS included
    prompts: TaskFile
    bos: bool = True

    @property
    def n_prompts(self) -> int:
        return int(self.clean.shape[0])

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple[list[int], list[int]]:
        """A seeded split of the prompts into (fit rows, held-out rows), ``fraction`` of them on the fit side: find
        a circuit on one part, score it on the other (in-sample scores are optimistic: the search chose the edges
        that work on exactly those prompts). Both sides need at least 2 prompts (:class:`InputError` otherwise)."""
        import random

        if not 0 < fraction < 1:
            raise InputError(f"fraction must be in (0, 1) (the share of prompts the circuit is found on), got "
                             f"{fraction}")
        n = self.n_prompts
        n_fit = round(n * fraction)
        if n_fit < 2 or n - n_fit < 2:
            raise InputError(f"a held-out split needs at least 2 prompts on each side; {n} prompts at fraction "
                             f"{fraction:g} give {n_fit} and {n - n_fit}: use a task with at least 4 prompts")
        rows = list(range(n))
        random.Random(f"mechanism-split:{seed}").shuffle(rows)
        return sorted(rows[:n_fit]), sorted(rows[n_fit:])

    def subset(self, rows: Sequence[int]) -> TokenizedTask:
        """The task restricted to prompts ``rows`` (in that order): for held-out splits and resampled prompt sets.
        Padding beyond the longest kept prompt is left in place (it never changes the logits at ``answer_pos``)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        if idx.numel() == 0:
            raise InputError("a task subset needs at least one prompt")
        picked = self.prompts.model_copy(update={"prompts": [self.prompts.prompts[int(i)] for i in idx]})
        return dataclasses.replace(self, clean=self.clean[idx], corrupt=self.corrupt[idx],
                                   answer_pos=self.answer_pos[idx], answers=self.answers[idx], wrong=self.wrong[idx],
                                   seq_lens=self.seq_lens[idx], prompts=picked)


def tokenize_task(task: TaskFile, tokenizer: Any, *, n_ctx: int, prepend_bos: bool = True) -> TokenizedTask:
    """Tokenise a task for a model with context ``n_ctx``; refuse what would make patching meaningless.

    Checks, each an :class:`InputError` naming the prompt index and text:

    * every answer and wrong answer is exactly one token (the metric compares single next-token logits);
      leading spaces matter for BPE tokenizers: ``" Mary"`` and ``"Mary"`` are different tokens;
    * a prompt's clean and corrupt texts tokenise to the same length (position-wise patching needs it);
    * a prompt (with BOS) fits in ``n_ctx``.

    Prompts of different lengths across the file are right-padded with the pad id. A causal model's outputs at
    earlier positions do not depend on later ones, so padding never changes the logits at ``answer_pos``.
    Texts are tokenised like TransformerLens' ``to_tokens``: BOS (when ``prepend_bos``) and then the text's
    tokens without other special tokens.
    """
    prompts = task.prompts
    clean_ids = _encode([p.clean for p in prompts], tokenizer)
    corrupt_ids = _encode([p.corrupt for p in prompts], tokenizer)
    answer_strings = sorted({a for p in prompts for a in (*p.answers, *p.wrong_answers)})
    answer_ids = dict(zip(answer_strings, _encode(answer_strings, tokenizer), strict=True))

    n_bos = 1 if prepend_bos else 0
    for i, (p, cl, co) in enumerate(zip(prompts, clean_ids, corrupt_ids, strict=True)):
        for kind, strings in (("answer", p.answers), ("wrong answer", p.wrong_answers)):
            for s in strings:
                ids = answer_ids[s]
                if len(ids) != 1:
                    pieces = [tokenizer.decode([t]) for t in ids]
                    raise InputError(f"prompt {i} ({_short(p.clean)}): {kind} {s!r} tokenises to {len(ids)} "
                                     f"tokens {pieces}; use a single-token {kind} (with its leading space)")
        if len(cl) != len(co):
            raise InputError(f"prompt {i}: clean {_short(p.clean)} tokenises to {len(cl)} tokens but corrupt "
                             f"{_short(p.corrupt)} to {len(co)}; make them the same length in tokens (swap "
                             "single-token words)")
        if not cl:
            raise InputError(f"prompt {i}: clean {_short(p.clean)} tokenises to no tokens; give it some text")
        if len(cl) + n_bos > n_ctx:
            raise InputError(f"prompt {i} ({_short(p.clean)}) is {len(cl) + n_bos} tokens"
                             f"{' with BOS' if n_bos else ''} but the model's context is {n_ctx}: shorten it")

    bos = [_bos_id(tokenizer)] if prepend_bos else []
    pad_id = _pad_id(tokenizer)
    seq_lens = torch.tensor([len(c) + n_bos for c in clean_ids], dtype=torch.long)
    return TokenizedTask(
        clean=_pad_rows([bos + c for c in clean_ids], pad_id),
        corrupt=_pad_rows([bos + c for c in corrupt_ids], pad_id),
        answer_pos=seq_lens - 1,
        answers=_pad_rows([[answer_ids[a][0] for a in p.answers] for p in prompts], -1),
        wrong=_pad_rows([[answer_ids[a][0] for a in p.wrong_answers] for p in prompts], -1),
        seq_lens=seq_lens,
        prompts=task,
        bos=prepend_bos,
    )


def _encode(texts: list[str], tokenizer: Any) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in
            tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]]


def _pad_rows(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# ============================================================================= helpers
def _listing(names: Iterable[Any], at_most: int = 10) -> str:
    names = [str(n) for n in names]
    if not names:
        return "none"
    more = f", … ({len(names) - at_most} more)" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def _short(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def _first_sentence(exc: BaseException, width: int = 120) -> str:
    """The start of an exception's message, short enough to nest in a one-line error."""
    lines = str(exc).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else exc.__class__.__name__
    return text if len(text) <= width else text[: width - 1] + "…"

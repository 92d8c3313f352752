"""LEAF's JSON datasets: ``data.dataset = "leaf"``.

LEAF (Caldas et al. 2018, TalwalkarLab/leaf; the data of FedProx, SCAFFOLD and many papers)
writes each split as a folder of JSON files (``data/<task>/data/train/*.json`` and
``.../test/*.json`` after its ``preprocess.sh``), each file an object::

    {"users": [u, ...], "num_samples": [n_u, ...], "user_data": {u: {"x": [...], "y": [...]}, ...}}

with an optional ``"hierarchies"`` list (Shakespeare: the play of each role), as written by
LEAF's ``data/utils/split_data.py`` and read by its ``models/utils/model_utils.py:read_data``.
``data.path`` and ``data.test_path`` name the train and test folders (every ``*.json`` in them,
in natural name order: ``all_data_2`` before ``all_data_10``) or single files.

The sample types of LEAF's tasks (``data.options.task``, default ``"auto"``: told from the data):

* ``femnist``: ``x`` rows of 784 floats in [0, 1] (LEAF's ``femnist/preprocess/data_to_json.py``
  flattens 28x28 images) -> float32 ``(1, 28, 28)``; ``y`` class ids 0-61.
* ``synthetic``: feature vectors of any other width (LEAF's Synthetic(alpha, beta): 60) -> float32
  ``(d,)``; ``y`` class ids.
* ``shakespeare``: ``x`` strings of 80 characters, ``y`` the next character (LEAF's
  ``shakespeare/preprocess/shake_utils.py``) -> ids into LEAF's 80-letter vocabulary
  :data:`LETTERS` (``models/utils/language_utils.py``), x int64 ``(80,)``, one class per sample
  (``num_classes = 80``; the model predicts after the last position: ``char_lstm`` with
  ``model.options.outputs = "last"``). A character outside the vocabulary is an error.
* ``sent140``: ``x`` rows of the tweet's fields ``[id, date, query, user, text]``, ``y`` 0/1
  (LEAF's ``sent140/preprocess/data_to_json.py``) -> the text's words as LEAF's
  ``line_to_indices`` makes them (words ``[\\w']+|[.,!?;]``, the first ``max_words = 25``, a word
  outside the vocabulary and the padding both the id ``len(vocabulary)``), int64 ``(25,)``. The
  vocabulary is the user's, never downloaded: ``data.options.vocabulary`` = a text file of one
  word per line, a JSON list of words, or LEAF's ``embs.json`` (only its ``"vocab"`` list is read).
* ``celeba``: image file names; out of scope (hpcfed reads no image folders): an error says so.

``partition = "natural"``: the clients are LEAF's users of the train files, in file order, the
first ``data.num_clients`` of them; the test files' users are pooled into one test set (LEAF's
by-sample split gives train and test the same users; a by-user split gives disjoint ones, which
works the same). Other partitions pool every train user and split as asked.

Reading. Parsing a 100 MB LEAF file into Python objects takes ~1 GB, and a rank needs only the
users it trains. So each file is indexed once: a scan finds every user's ``{x, y}`` value and
records its byte span (and validates it: keys, ragged rows, labels, vocabulary, UTF-8). The index
is cached (``$HPCFED_CACHE``, else ``$XDG_CACHE_HOME/hpcfed``, else ``~/.cache/hpcfed``, or
``data.options.index_cache``), one small JSON per data file keyed by its path, size and
modification time; ranks starting together share the work through a lock per file. A client is
then read by one ``seek`` and one ``read`` of its span: a rank's memory holds the index and the
clients it trains, whatever the rank count. Every error names the file, the user and the key.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from hpcfed.data.federated import FederatedData
from hpcfed.errors import UserError

# LEAF's Shakespeare vocabulary (models/utils/language_utils.py: ALL_LETTERS), in its order
LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
TASKS = ("auto", "femnist", "synthetic", "shakespeare", "sent140", "celeba")
FEMNIST_SHAPE = (1, 28, 28)
MAX_WORDS = 25  # LEAF's line_to_indices default
INDEX_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

_LETTER_IDS = np.full(128, -1, dtype=np.int64)  # ASCII code -> LEAF letter id (-1: not a letter)
_LETTER_IDS[[ord(c) for c in LETTERS]] = np.arange(len(LETTERS))
_WORDS = re.compile(r"[\w']+|[.,!?;]")  # LEAF's split_line
_SPACE = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)
_DECODER = json.JSONDecoder()

# bytes of LEAF files read by this process, by file (the tests and benchmarks check that a rank
# reads only the spans of the clients it trains)
BYTES_READ: dict[str, int] = {}


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def json_files(path: str, key_name: str) -> list[Path]:
    """The JSON files of a LEAF split: a folder's ``*.json`` (natural name order), or one file."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise UserError(
            f"{key_name} = {path}: no such file or folder; expected LEAF's train/ or test/ folder"
        )
    files = sorted((f for f in p.iterdir() if f.suffix == ".json" and f.is_file()), key=_natural_key)
    if not files:
        raise UserError(
            f"{key_name} = {path}: no *.json files; expected LEAF's JSON files (after preprocess.sh)"
        )
    return files


# --------------------------------------------------------------------------- sample types


def _has_surrogate(obj: Any) -> bool:
    if isinstance(obj, str):
        return bool(_SURROGATE.search(obj))
    if isinstance(obj, list):
        return any(_has_surrogate(o) for o in obj)
    return False


def _labels(y: list, where: str) -> tuple[np.ndarray, int]:
    """Integer class ids >= 0 (LEAF writes JSON integers); (ids, max)."""
    if any(isinstance(v, bool) or not isinstance(v, int) for v in y):
        bad = next(v for v in y if isinstance(v, bool) or not isinstance(v, int))
        raise UserError(f"{where}['y'] holds {bad!r}; expected integer class ids")
    ids = np.asarray(y, dtype=np.int64)
    if ids.min() < 0:
        raise UserError(f"{where}['y'] holds {int(ids.min())}; expected class ids >= 0")
    return ids, int(ids.max())


def _letter_ids(strings: list[str], where: str, key: str) -> np.ndarray:
    """LEAF letter ids of equal-length strings, ``(n, length)``; UserError outside the vocabulary."""
    codes = np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.where(codes < 128, _LETTER_IDS[np.minimum(codes, 127)], -1)
    if (ids < 0).any():
        bad = chr(int(codes[np.argmax(ids < 0)]))
        raise UserError(
            f"{where}[{key!r}] holds the character {bad!r}, outside LEAF's Shakespeare vocabulary "
            "(models/utils/language_utils.py, 80 letters)"
        )
    return ids.reshape(len(strings), -1)


def summarise(value: Any, where: str) -> tuple[str, tuple[int, ...], int, int]:
    """Check one user's ``{x, y}``; return (kind, sample shape, samples, max label or -1).

    ``kind``: ``vector`` (float rows), ``chars`` (Shakespeare strings), ``tweet`` (Sent140 rows)."""
    if not isinstance(value, dict):
        raise UserError(f"{where} is {type(value).__name__}; expected an object {{'x': [...], 'y': [...]}}")
    for key in ("x", "y"):
        if key not in value:
            raise UserError(f"{where} has no key {key!r}; expected {{'x': [...], 'y': [...]}}")
        if not isinstance(value[key], list):
            raise UserError(
                f"{where}[{key!r}] is {type(value[key]).__name__}; expected a list, one entry per sample"
            )
    x, y = value["x"], value["y"]
    if len(x) != len(y):
        raise UserError(
            f"{where}: 'x' has {len(x)} samples but 'y' has {len(y)}; expected one label per sample"
        )
    if not y:
        raise UserError(f"{where} has no samples ('x' and 'y' are empty); expected at least one")
    first = x[0]
    if isinstance(first, str):
        if all(isinstance(v, str) for v in y):  # Shakespeare: a string and its next character
            lengths = {len(s) if isinstance(s, str) else -1 for s in x}
            if len(lengths) != 1 or -1 in lengths:
                raise UserError(
                    f"{where}['x'] holds strings of lengths {sorted(lengths)} (or non-strings); expected "
                    "strings of one length (ragged rows)"
                )
            if any(len(v) != 1 for v in y):
                bad = next(v for v in y if len(v) != 1)
                raise UserError(
                    f"{where}['y'] holds {bad!r}; expected single characters (the next character)"
                )
            _letter_ids(x, where, "x")
            _letter_ids(y, where, "y")
            return "chars", (len(first),), len(y), -1
        if first.lower().endswith(IMAGE_SUFFIXES):
            raise UserError(
                f"{where}['x'] holds image file names ({first!r}): LEAF's CelebA, whose images live in a "
                "separate folder, is out of scope (hpcfed reads samples stored in the JSON files only)"
            )
        raise UserError(
            f"{where}['x'] holds strings with non-string 'y'; expected LEAF Shakespeare's characters"
        )
    if isinstance(first, list) and first and all(isinstance(v, str) for v in first):  # Sent140's rows
        for row in x:
            if not (isinstance(row, list) and len(row) >= 5 and isinstance(row[4], str)):
                raise UserError(
                    f"{where}['x'] holds {str(row)[:60]!r}; expected Sent140 rows "
                    "[id, date, query, user, text]"
                )
        return "tweet", (), len(y), _labels(y, where)[1]
    if isinstance(first, list):  # feature vectors (FEMNIST's pixels, Synthetic's features)
        try:
            arr = np.asarray(x, dtype=np.float32)
        except (ValueError, TypeError):
            widths = sorted({len(r) if isinstance(r, list) else -1 for r in x})
            raise UserError(
                f"{where}['x'] has rows of lengths {widths[:6]} or non-numbers; expected numeric rows of one "
                "length (ragged arrays)"
            ) from None
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise UserError(
                f"{where}['x'] has shape {arr.shape}; expected rows of numbers, (samples, features)"
            )
        return "vector", (arr.shape[1],), len(y), _labels(y, where)[1]
    raise UserError(
        f"{where}['x'] holds {type(first).__name__} samples; expected number rows (FEMNIST, Synthetic), "
        "strings (Shakespeare) or Sent140 rows"
    )


# --------------------------------------------------------------------------- the index


class _ByteOffsets:
    """Byte offset of increasing character offsets of a decoded text (UTF-8, surrogateescape)."""

    def __init__(self, text: str, ascii_only: bool):
        self.text, self.ascii = text, ascii_only
        self.char, self.byte = 0, 0

    def __call__(self, pos: int) -> int:
        if self.ascii:
            return pos
        self.byte += len(self.text[self.char : pos].encode("utf-8", "surrogateescape"))
        self.char = pos
        return self.byte


def _skip(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()


def _expect(text: str, pos: int, char: str, fail, what: str) -> int:
    if text[pos : pos + 1] != char:
        got = text[pos : pos + 12] or "the end of the file"
        raise fail(f"not LEAF JSON at character {pos}: expected {char!r} {what}, found {got!r}")
    return pos + 1


def _value(text: str, pos: int, fail, where: str) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        raise fail(f"{where}: invalid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise fail(f"{where}: JSON nested too deeply") from None


class _Structure:
    """Where an ASCII JSON text has its brackets, braces and quotes (byte = character offsets),
    found with NumPy a chunk at a time: what the scan's fast path walks instead of the text."""

    IS_STRUCTURE = np.zeros(256, bool)  # byte -> is it one of [ ] { } "
    IS_STRUCTURE[list(b'[]{}"')] = True

    def __init__(self, raw: bytes, chunk: int = 1 << 24):
        found = []
        for start in range(0, len(raw), chunk):
            b = np.frombuffer(raw, np.uint8, count=min(chunk, len(raw) - start), offset=start)
            found.append(np.flatnonzero(self.IS_STRUCTURE[b]) + start)
        at = np.concatenate(found) if found else np.zeros(0, np.int64)
        self.at: list[int] = at.tolist()
        self.char: bytes = bytes(np.frombuffer(raw, np.uint8)[at]) if at.size else b""

    def string_end(self, text: str, k: int) -> int:
        """Index (into ``at``) of the quote closing the string opened by quote ``k``."""
        j = k + 1
        while True:
            while self.char[j] != 34:  # '"'
                j += 1
            slashes, p = 0, self.at[j] - 1
            while text[p] == "\\":  # an escaped quote is preceded by an odd run of backslashes
                slashes, p = slashes + 1, p - 1
            if slashes % 2 == 0:
                return j
            j += 1


def _vector_user(text: str, tokens: _Structure, pos: int, where: str) -> tuple[int, int, int, int] | None:
    """The fast path of the scan for a user ``{"x": [[numbers], ...], "y": [ints]}``: (end of its
    value, samples, row width, max label) from the brackets, commas and ``y`` alone, so no float
    is parsed (parsing FEMNIST's 600 M pixel values is what makes a full scan slow). The checks
    of :func:`summarise` that need structure are made here (keys, rows equal in number to labels
    and in width, integer labels); a number that is not one (``null``) is found when the client
    is read. None for anything else: the full parse then decides, with its exact error."""
    at, char = tokens.at, tokens.char
    k = bisect.bisect_left(at, pos)
    if k == len(at) or at[k] != pos or char[k] != 123:  # '{'
        return None
    depth, key, in_x, row, y_at, end = 0, "", False, 0, None, None
    widths: list[int] = []
    while k < len(at):
        c, p = char[k], at[k]
        if c == 34:  # a string: a key at depth 1 if a colon follows
            close = tokens.string_end(text, k)
            after = _skip(text, at[close] + 1)
            if depth == 1 and text[after : after + 1] == ":":
                key = text[p + 1 : at[close]]
                if key == "y":
                    y_at = _skip(text, after + 1)
            elif in_x:
                return None  # strings among the numbers: not a vector user
            k = close + 1
            continue
        if c in (91, 123):  # '[' or '{'
            depth += 1
            if depth == 2 and key == "x" and c == 91 and not widths and not in_x:
                in_x = True
            elif in_x and depth == 3 and c == 91:
                row = p + 1
            elif in_x:
                return None  # objects or deeper lists in x
        else:  # ']' or '}'
            if in_x and depth == 3:
                widths.append(0 if _skip(text, row) == p else text.count(",", row, p) + 1)
            elif in_x and depth == 2:
                in_x = False
            depth -= 1
            if depth == 0:
                end = p + 1
                break
        k += 1
    if end is None or y_at is None or not widths or len(set(widths)) != 1 or widths[0] == 0:
        return None
    try:
        y, _ = _DECODER.raw_decode(text, y_at)
    except json.JSONDecodeError:
        return None
    if not isinstance(y, list) or len(y) != len(widths):
        return None
    return end, len(y), widths[0], _labels(y, where)[1]


def build_index(path: Path, key_name: str) -> dict:
    """Scan one LEAF JSON file: its users' sizes and byte spans, checked (see the module docstring).

    The top-level object is walked key by key; each ``user_data`` value is decoded on its own
    (``JSONDecoder.raw_decode`` at its offset), checked and dropped, so the scan holds the file's
    text and one user at a time, never the whole file as Python objects. Once the first user has
    shown rows of numbers, the others go through :func:`_vector_user` (structure only) when the
    file is ASCII, as ``json.dump`` writes it: the same index, 5x faster on FEMNIST."""

    def fail(what: str) -> UserError:
        return UserError(f"{key_name} = {path}: {what}")

    raw = path.read_bytes()
    try:
        text, dirty = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, dirty = raw.decode("utf-8", "surrogateescape"), True
    to_byte = _ByteOffsets(text, len(text) == len(raw))
    # the fast path needs character = byte offsets: json.dump's default (ensure_ascii) output
    tokens = _Structure(raw) if len(text) == len(raw) else None
    del raw
    top: dict[str, Any] = {}
    spans: dict[str, tuple[int, int, int, int]] = {}  # user -> (samples, start, end, max label)
    kinds: dict[tuple[str, tuple[int, ...]], str] = {}  # (kind, shape) -> first user with it
    pos = _expect(text, _skip(text, 0), "{", fail, "(a JSON object with users, num_samples, user_data)")
    while True:
        pos = _skip(text, pos)
        if text[pos : pos + 1] == "}":
            break
        key, pos = _value(text, pos, fail, "a top-level key")
        if not isinstance(key, str):
            raise fail(f"not LEAF JSON at character {pos}: expected a key string")
        pos = _skip(text, _expect(text, _skip(text, pos), ":", fail, f"after key {key!r}"))
        if key != "user_data":
            top[key], pos = _value(text, pos, fail, f"key {key!r}")
        else:
            top[key] = True
            pos = _expect(text, pos, "{", fail, "(user_data: an object of users)")
            while True:
                pos = _skip(text, pos)
                if text[pos : pos + 1] == "}":
                    pos += 1
                    break
                user, pos = _value(text, pos, fail, "a user id of user_data")
                pos = _skip(text, _expect(text, _skip(text, pos), ":", fail, f"after user {user!r}"))
                where = f"user {user!r}: user_data[{user!r}]"
                if user in spans:
                    raise fail(f"user {user!r} appears twice in user_data")
                vectors = tokens is not None and len(kinds) == 1 and next(iter(kinds))[0] == "vector"
                quick = _vector_user(text, tokens, pos, f"{key_name} = {path}: {where}") if vectors else None
                if quick is not None:  # rows of numbers like the first user's: no float parsed
                    end, n, width, high = quick
                    kind, shape = "vector", (width,)
                else:
                    value, end = _value(text, pos, fail, where)
                    if dirty and _SURROGATE.search(text, pos, end):
                        bad = "x" if isinstance(value, dict) and _has_surrogate(value.get("x")) else "y"
                        raise fail(f"{where}[{bad!r}] holds text that is not UTF-8; expected UTF-8 JSON")
                    kind, shape, n, high = summarise(value, f"{key_name} = {path}: {where}")
                kinds.setdefault((kind, shape), user)
                if len(kinds) > 1:
                    (k0, s0), first = next(iter(kinds.items()))
                    raise fail(
                        f"{where}['x'] holds {kind} samples of shape {shape}; expected {k0} of shape {s0} "
                        f"like user {first!r} (ragged arrays)"
                    )
                spans[user] = (n, to_byte(pos), to_byte(end), high)
                pos = _skip(text, end)
                if text[pos : pos + 1] == ",":
                    pos += 1
        pos = _skip(text, pos)
        if text[pos : pos + 1] == ",":
            pos += 1
    if dirty and _SURROGATE.search(text):
        raise fail("holds bytes that are not UTF-8 outside any user's data; expected UTF-8 JSON")
    for key in ("users", "num_samples", "user_data"):
        if key not in top:
            raise fail(f"no key {key!r}; expected LEAF's {{users, num_samples, user_data}}")
    users, counts = top["users"], top["num_samples"]
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise fail("key 'users' is not a list of user ids")
    if not isinstance(counts, list) or len(counts) != len(users):
        raise fail(f"key 'num_samples' has {len(counts) if isinstance(counts, list) else 'no'} entries for "
                   f"{len(users)} users; expected one count per user")  # fmt: skip
    if not users:
        raise fail("key 'users' is empty; expected at least one user")
    for user, count in zip(users, counts):
        if user not in spans:
            raise fail(f"user {user!r} is listed in 'users' but has no data in 'user_data'")
        if count != spans[user][0]:
            raise fail(
                f"user {user!r}: num_samples says {count} but user_data[{user!r}]['y'] has {spans[user][0]}"
            )
    extra = sorted(set(spans) - set(users))
    if extra:
        raise fail(f"user {extra[0]!r} has data in 'user_data' but is not listed in 'users'")
    ((kind, shape),) = kinds
    stat = path.stat()
    return {
        "version": INDEX_VERSION, "path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "kind": kind, "shape": list(shape), "users": [[u, *spans[u]] for u in users],
    }  # fmt: skip


def _default_cache() -> Path:
    from hpcfed.data.digits import _cache_dir

    return _cache_dir() / "leaf-index"


def _cache_file(path: Path, cache: Path) -> Path:
    stat = path.stat()
    key = f"{INDEX_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache / f"{path.stem[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def _read_cached(file: Path) -> dict | None:
    try:
        entry = json.loads(file.read_text())
        return entry if entry.get("version") == INDEX_VERSION else None
    except (OSError, ValueError):
        return None


def _build_cached(path: Path, key_name: str, cache: Path | None, blocking: bool) -> dict | None:
    """The index of ``path`` from the cache, else built and cached under a lock on its cache file.
    None: another process holds the lock (``blocking = False``) and is building it."""
    import fcntl

    if cache is None:
        return build_index(path, key_name)
    file = _cache_file(path, cache)
    entry = _read_cached(file)
    if entry is not None:
        return entry
    try:
        cache.mkdir(parents=True, exist_ok=True)
        handle = open(file.with_suffix(".lock"), "a")  # noqa: SIM115 - closed below, releasing the lock
    except OSError:  # an unwritable cache only costs the scan every time
        return build_index(path, key_name)
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return None
        except OSError:  # no locks here (Lustre without flock, NFS without lockd): build unlocked;
            pass  # ranks may then scan the same file twice, and the atomic rename keeps it whole
        entry = _read_cached(file)  # built meanwhile by the process that held the lock
        if entry is None:
            entry = build_index(path, key_name)
            tmp = file.with_suffix(f".tmp{os.getpid()}")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(entry))
                tmp.replace(file)  # atomic: a reader sees the whole index or none
        return entry


def index_files(
    files: list[Path], key_name: str, cache: Path | None, enough: int | None = None
) -> list[dict]:
    """The indexes of ``files``, in order. With ``enough``, only the first files that hold that
    many users (``natural`` with ``num_clients`` users: later files are never opened). Without,
    every file; one that another process is indexing is skipped and taken up after the others,
    so ranks starting together on a cold cache share the scan instead of queueing behind one."""
    if enough is not None:
        entries: list[dict] = []
        for path in files:
            if sum(len(e["users"]) for e in entries) >= enough:
                break
            entries.append(_build_cached(path, key_name, cache, blocking=True))
        return entries
    found: dict[int, dict | None] = {
        i: _build_cached(p, key_name, cache, blocking=False) for i, p in enumerate(files)
    }
    for i, entry in found.items():
        if entry is None:
            found[i] = _build_cached(files[i], key_name, cache, blocking=True)
    return [found[i] for i in range(len(files))]


# --------------------------------------------------------------------------- vocabulary (Sent140)


def read_vocabulary(path: str) -> dict[str, int]:
    """``data.options.vocabulary``: word -> id (its line or list position). A text file of one
    word per line, a JSON list, or LEAF's ``embs.json`` of which only ``"vocab"`` is decoded."""
    key = "data.options.vocabulary"
    p = Path(str(path))
    if not p.is_file():
        raise UserError(
            f"{key} = {path}: no such file; expected a vocabulary (one word per line, or embs.json)"
        )
    with open(p, "rb") as f:
        head = f.read(1 << 16)
    try:
        if head.lstrip()[:1] in (b"[", b"{"):
            words = _json_words(p, head)
        else:
            words = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"{key} = {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not words or not all(isinstance(w, str) for w in words):
        raise UserError(f"{key} = {path}: expected a non-empty list of words")
    vocab: dict[str, int] = {}
    for i, w in enumerate(words):
        vocab.setdefault(w, i)
    return vocab


def _json_words(p: Path, head: bytes) -> list:
    key = f"data.options.vocabulary = {p}"
    if head.lstrip()[:1] == b"[":
        try:
            return json.loads(p.read_bytes())
        except ValueError as exc:
            raise UserError(f"{key}: invalid JSON ({exc})") from None
    # LEAF's embs.json: {"vocab": [...], "emba": [[300 floats] x 400,000]}: decode only the list
    size = p.stat().st_size
    chunk = 1 << 22
    with open(p, "rb") as f:
        while True:
            f.seek(0)
            text = f.read(chunk).decode("utf-8", "ignore")
            found = re.search(r'"vocab"\s*:\s*', text)
            if found:
                try:
                    return _DECODER.raw_decode(text, found.end())[0]
                except json.JSONDecodeError:
                    pass  # the list runs past this chunk
            if chunk >= size:
                raise UserError(f"{key}: no list 'vocab'; expected LEAF's embs.json or a word list")
            chunk *= 4


def tweet_tokens(rows: list, vocab: dict[str, int], max_words: int) -> np.ndarray:
    """LEAF's ``line_to_indices`` on each row's text: word ids, unknown and padding = len(vocab)."""
    unknown = len(vocab)
    out = np.full((len(rows), max_words), unknown, dtype=np.int64)
    for i, row in enumerate(rows):
        ids = [vocab.get(w, unknown) for w in _WORDS.findall(row[4])[:max_words]]
        out[i, : len(ids)] = ids
    return out


# --------------------------------------------------------------------------- the dataset


class LeafUsers:
    """The users of one split (train or test): sizes from the index, reads of one user's span."""

    def __init__(self, entries: list[dict], key_name: str, task: str, vocab, max_words: int):
        self.key_name, self.task, self.vocab, self.max_words = key_name, task, vocab, max_words
        self.users: list[tuple[str, str, int, int]] = []  # (file, user, start, end)
        sizes, seen = [], {}
        for entry in entries:
            for user, n, start, end, _ in entry["users"]:
                if user in seen:
                    raise UserError(
                        f"{key_name} = {entry['path']}: user {user!r} is also in {seen[user]}; expected each "
                        "user in one file of a split"
                    )
                seen[user] = entry["path"]
                self.users.append((entry["path"], user, start, end))
                sizes.append(n)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.max_label = max((u[4] for e in entries for u in e["users"]), default=-1)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        path, user, start, end = self.users[i]
        try:
            with open(path, "rb") as f:
                f.seek(start)
                chunk = f.read(end - start)
            value = json.loads(chunk)
        except (OSError, ValueError) as exc:  # changed or removed since it was indexed
            raise UserError(
                f"{self.key_name} = {path}: user {user!r}: cannot read user_data[{user!r}] ({exc}); if the "
                "file changed, its index is rebuilt at the next start"
            ) from None
        BYTES_READ[path] = BYTES_READ.get(path, 0) + len(chunk)
        return self.convert(value, f"{self.key_name} = {path}: user {user!r}: user_data[{user!r}]")

    def convert(self, value: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = value["x"], value["y"]
        if self.task == "shakespeare":
            return _letter_ids(x, where, "x"), _letter_ids(y, where, "y")[:, 0]
        labels = np.asarray(y, dtype=np.int64)
        if self.task == "sent140":
            return tweet_tokens(x, self.vocab, self.max_words), labels
        try:
            features = np.asarray(x, dtype=np.float32)
        except (ValueError, TypeError):
            features = np.full(1, np.nan, np.float32)
        if not np.isfinite(features).all():  # null, a string, NaN: past the scan's fast path
            raise UserError(f"{where}['x'] holds values that are not finite numbers; expected numeric rows")
        if self.task == "femnist":
            features = features.reshape(-1, *FEMNIST_SHAPE)
        return features, labels

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every user, concatenated in order, into arrays allocated once (the sizes are known):
        the peak is the result plus one user, not twice the result."""
        total = int(self.sizes.sum())
        x = y = None
        at = 0
        for i in range(len(self.users)):
            xi, yi = self.read(i)
            if x is None:
                x = np.empty((total, *xi.shape[1:]), xi.dtype)
                y = np.empty((total, *yi.shape[1:]), yi.dtype)
            x[at : at + len(yi)], y[at : at + len(yi)] = xi, yi
            at += len(yi)
        return x, y


def _task(entries: list[dict], asked: str) -> tuple[str, tuple[int, ...]]:
    kind, shape = entries[0]["kind"], tuple(entries[0]["shape"])
    detected = {"chars": "shakespeare", "tweet": "sent140"}.get(kind)
    if detected is None:
        detected = "femnist" if shape == (784,) else "synthetic"
    if asked not in ("auto", detected) and not (asked == "synthetic" and kind == "vector"):
        raise UserError(
            f"data.options.task = {asked!r}: {entries[0]['path']} holds {detected} samples ({kind} of shape "
            f"{shape}); expected task 'auto' or {detected!r}"
        )
    return (detected if asked == "auto" else asked), shape


def load_federated(
    seed: int, path: str | None, test_path: str | None, num_clients: int, partition: str,
    task: str = "auto", vocabulary: str | None = None, max_words: int = MAX_WORDS,
    num_classes: int | None = None, index_cache: str | None = None,
) -> FederatedData:  # fmt: skip
    """``data.dataset = "leaf"`` (see the module docstring)."""
    del seed  # LEAF's files fix the users and their samples
    if path is None or test_path is None:
        raise UserError("data.path and data.test_path: dataset 'leaf' needs LEAF's train/ and test/ folders")
    if task not in TASKS:
        raise UserError(f"data.options.task = {task!r}: expected one of {', '.join(TASKS)}")
    if task == "celeba":
        raise UserError(
            "data.options.task = 'celeba': LEAF's CelebA stores image file names, its images in a separate "
            "folder; out of scope (hpcfed reads samples stored in the JSON files only)"
        )
    for key, value in (("max_words", max_words), ("num_classes", num_classes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"data.options.{key} = {value!r}: expected a positive integer")
    cache = _default_cache() if index_cache is None else (Path(index_cache) if index_cache else None)
    natural = partition == "natural"
    train_files = json_files(path, "data.path")
    train_entries = index_files(train_files, "data.path", cache, enough=num_clients if natural else None)
    test_entries = index_files(json_files(test_path, "data.test_path"), "data.test_path", cache)
    task, shape = _task(train_entries, task)
    _, test_shape = _task(test_entries, task)
    if test_shape != shape or test_entries[0]["kind"] != train_entries[0]["kind"]:
        raise UserError(
            f"data.test_path = {test_path}: samples of shape {test_shape} ({test_entries[0]['kind']}); "
            f"expected {shape} ({train_entries[0]['kind']}) as in data.path"
        )
    for entries, key in ((train_entries, "data.path"), (test_entries, "data.test_path")):
        for entry in entries:
            if (entry["kind"], tuple(entry["shape"])) != (train_entries[0]["kind"], shape):
                raise UserError(
                    f"{key} = {entry['path']}: samples of shape {tuple(entry['shape'])} ({entry['kind']}); "
                    f"expected {shape} ({train_entries[0]['kind']}) as in {train_entries[0]['path']}"
                )
    vocab = None
    if task == "sent140":
        if vocabulary is None:
            raise UserError(
                "data.options.vocabulary: LEAF's Sent140 needs a vocabulary file (one word per line, or "
                "LEAF's embs.json); hpcfed downloads nothing"
            )
        vocab = read_vocabulary(vocabulary)
    elif vocabulary is not None:
        raise UserError(f"data.options.vocabulary: only LEAF's Sent140 takes one; this is {task}")
    train = LeafUsers(train_entries, "data.path", task, vocab, max_words)
    test = LeafUsers(test_entries, "data.test_path", task, vocab, max_words)
    if natural and num_clients > len(train.sizes):
        raise UserError(
            f"data.num_clients: {num_clients} clients asked for but data.path = {path} holds "
            f"{len(train.sizes)} LEAF users; expected at most {len(train.sizes)}"
        )
    if task == "shakespeare":
        k = len(LETTERS)
    else:
        k = max(train.max_label, test.max_label) + 1
        if num_classes is not None:
            if k > num_classes:
                raise UserError(
                    f"data.options.num_classes = {num_classes}: the files hold label {k - 1}; expected "
                    f"labels in [0, {num_classes})"
                )
            k = num_classes
    input_shape = {"femnist": FEMNIST_SHAPE, "sent140": (max_words,)}.get(task, shape)
    if not natural:
        X, y = train.read_all()
        return FederatedData.pooled(train=(X, y), test=test.read_all(), num_classes=k, name="leaf")
    return FederatedData.lazy(
        sizes=train.sizes, read_client=train.read, test=test.read_all, input_shape=input_shape,
        num_classes=k, name="leaf",
    )  # fmt: skip

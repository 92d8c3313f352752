"""LEAF's JSON datasets (``data.dataset = "leaf"``): files in LEAF's exact layout are read back as
written (client count, sizes, samples), each rank reads only the byte spans of the clients it
trains, the index is built once and cached, bad files are exit 2 naming the file, the user and
the key, and the Shakespeare task learns on a corpus with real structure.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from hpcfed.config import load_job
from hpcfed.data import leaf as leafmod
from hpcfed.data import load_federated
from hpcfed.errors import UserError

from . import text_layouts as layouts
from .conftest import ROOT, hpcfed, run_in_process

FEMNIST_JOB = ROOT / "jobs" / "fedavg_femnist_leaf.toml"
SHAKESPEARE_JOB = ROOT / "jobs" / "fedavg_shakespeare_leaf.toml"


def _load(tmp_path: Path, train: Path, test: Path, job: Path = FEMNIST_JOB, *overrides: str):
    paths = [f'data.path="{train}"', f'data.test_path="{test}"']
    cfg = load_job(
        job, [*paths, f'data.options.index_cache="{tmp_path / "idx"}"', "clients_per_round=1", *overrides]
    )
    return load_federated(cfg.data, cfg.seed)


def _femnist(tmp_path: Path, users: int = 7, files: int = 3):
    train = layouts.femnist_users(users, (3, 9), seed=0)
    test = layouts.femnist_users(users, (1, 3), seed=1)
    layouts.write_leaf(tmp_path / "train", train, files, "train")
    layouts.write_leaf(tmp_path / "test", test, 2, "test")
    return train, test


# --------------------------------------------------------------------------- layouts read back


def test_femnist_users_read_back_as_written(tmp_path):
    train, test = _femnist(tmp_path)
    data = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=7")
    assert data.kind == "lazy" and data.num_clients == 7 and data.num_classes == 62
    assert data.input_shape == (1, 28, 28)
    assert data.client_sizes.tolist() == [len(u["y"]) for u in train.values()]  # file order
    for cid, user in enumerate(train.values()):
        x, y = data.client(cid)
        np.testing.assert_array_equal(x.numpy(), np.asarray(user["x"], np.float32).reshape(-1, 1, 28, 28))
        assert y.tolist() == user["y"]
    tx, ty = data.test  # every test user pooled, in file order
    assert ty.tolist() == [label for u in test.values() for label in u["y"]]
    np.testing.assert_array_equal(tx[:1].numpy().ravel(), np.float32(next(iter(test.values()))["x"][0]))


def test_files_in_natural_name_order_and_single_file(tmp_path):
    users = layouts.femnist_users(12, (1, 2), seed=0)
    paths = layouts.write_leaf(tmp_path / "train", users, 12, "train")
    for i, p in enumerate(paths):  # all_data_2 must come before all_data_10
        p.rename(p.with_name(f"all_data_{i}.json"))
    layouts.write_leaf(tmp_path / "test", users, 1, "test")
    data = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=12")
    assert data.client_sizes.tolist() == [len(u["y"]) for u in users.values()]
    one = _load(tmp_path, paths[0].with_name("all_data_3.json"), tmp_path / "test", FEMNIST_JOB,
                "data.num_clients=1")  # fmt: skip
    assert one.client(0)[1].tolist() == list(users.values())[3]["y"]


def test_synthetic_vectors(tmp_path):
    g = np.random.default_rng(0)
    users = {f"f_{u:05d}": {"x": g.normal(size=(n, 60)).round(4).tolist(), "y": g.integers(0, 10, n).tolist()}
             for u, n in enumerate([5, 9, 4])}  # fmt: skip
    layouts.write_leaf(tmp_path / "train", users, 1, "train")
    layouts.write_leaf(tmp_path / "test", users, 1, "test")
    data = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=3")
    assert data.input_shape == (60,) and data.num_classes == max(max(u["y"]) for u in users.values()) + 1
    x, y = data.client(1)
    assert x.dtype.is_floating_point and x.shape == (9, 60)
    np.testing.assert_array_equal(x.numpy(), np.asarray(users["f_00001"]["x"], np.float32))


def test_shakespeare_strings_become_leaf_letter_ids(tmp_path):
    corpus = layouts.stdlib_corpus(3, max_lines=6)
    train, test = layouts.shakespeare_users(corpus, test_every=3)
    plays = ["THE_STDLIB"] * 3
    layouts.write_leaf(tmp_path / "train", train, 2, "train", hierarchies=plays)
    layouts.write_leaf(tmp_path / "test", test, 1, "test", hierarchies=plays)
    data = _load(tmp_path, tmp_path / "train", tmp_path / "test", SHAKESPEARE_JOB, "data.num_clients=3")
    assert data.num_classes == 80 and data.input_shape == (80,)
    for cid, user in enumerate(train.values()):
        x, y = data.client(cid)
        assert x.dtype == y.dtype and not x.dtype.is_floating_point
        assert ["".join(leafmod.LETTERS[i] for i in row) for row in x.tolist()] == user["x"]
        assert "".join(leafmod.LETTERS[i] for i in y.tolist()) == "".join(user["y"])
    assert data.test[0].shape == (sum(len(u["y"]) for u in test.values()), 80)


def test_sent140_tokens_over_the_users_vocabulary(tmp_path):
    rows = [["1", "Mon Apr 06", "NO_QUERY", "amy", "I love it, really!"], ["2", "d", "q", "amy", "so sad"]]
    users = {"amy": {"x": rows, "y": [1, 0]}, "bob": {"x": [["3", "d", "q", "bob", "love love"]], "y": [1]}}
    layouts.write_leaf(tmp_path / "train", users, 2, "train")
    layouts.write_leaf(tmp_path / "test", users, 1, "test")
    words = ["i", "love", "it", ",", "really", "!", "so", "sad"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    # LEAF's embs.json (get_embs.py): only "vocab" is read; "emba" may be huge
    (tmp_path / "embs.json").write_text(json.dumps({"emba": [[0.5] * 3] * len(words), "vocab": words}))
    for vocab in ("vocab.txt", "embs.json"):
        data = _load(tmp_path, tmp_path / "train", tmp_path / "test", SHAKESPEARE_JOB,
                     "data.num_clients=2", f'data.options.vocabulary="{tmp_path / vocab}"',
                     "data.options.max_words=6")  # fmt: skip
        x, y = data.client(0)
        unk = len(words)  # LEAF's line_to_indices: unknown words and padding are len(vocab)
        # "I" is not "i" (LEAF does not lower-case); "today" is unknown
        assert x.tolist() == [[unk, 1, 2, 3, 4, 5], [6, 7, unk, unk, unk, unk]]
        assert y.tolist() == [1, 0] and data.num_classes == 2 and data.input_shape == (6,)
    with pytest.raises(UserError, match="data.options.vocabulary"):
        _load(tmp_path, tmp_path / "train", tmp_path / "test", SHAKESPEARE_JOB, "data.num_clients=2")


def test_celeba_is_out_of_scope(tmp_path):
    users = {"u1": {"x": ["000001.jpg", "000002.jpg"], "y": [0, 1]}}
    layouts.write_leaf(tmp_path / "train", users, 1, "train")
    layouts.write_leaf(tmp_path / "test", users, 1, "test")
    with pytest.raises(UserError, match="CelebA.*out of scope"):
        _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=1")


def test_other_partitions_pool_the_users(tmp_path):
    train, _ = _femnist(tmp_path)
    data = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB,
                 "data.partition=iid", "data.num_clients=3")  # fmt: skip
    assert data.num_clients == 3 and data.num_train == sum(len(u["y"]) for u in train.values())


# --------------------------------------------------------------------------- reading, index


def test_clients_are_read_by_their_byte_span_only(tmp_path):
    _femnist(tmp_path, users=9, files=3)
    leafmod.BYTES_READ.clear()
    data = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=9")
    train_files = sorted(str(p) for p in (tmp_path / "train").iterdir())
    assert not any(f in leafmod.BYTES_READ for f in train_files)  # start-up reads no client
    data.client(4)  # the second user of the second file
    read = {f: n for f, n in leafmod.BYTES_READ.items() if f in train_files}
    assert list(read) == [train_files[1]]
    assert read[train_files[1]] < (tmp_path / "train" / Path(train_files[1]).name).stat().st_size / 2


def test_natural_subset_indexes_only_the_files_it_needs(tmp_path):
    _femnist(tmp_path, users=9, files=3)  # 3 users per file
    data = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=2")
    assert data.num_clients == 2
    cached = sorted(p.name for p in (tmp_path / "idx").glob("*.json"))
    assert [n for n in cached if "_train_" in n] == [n for n in cached if n.startswith("all_data_0_") and
                                                      "_train_" in n]  # fmt: skip
    with pytest.raises(UserError, match=r"data.num_clients: 10 clients .* holds 9 LEAF users"):
        _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=10")


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    train, _ = _femnist(tmp_path)
    first = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=7")

    def no_scan(*args):
        raise AssertionError("scanned again")

    with monkeypatch.context() as m:  # a second start reads the cached index, scans nothing
        m.setattr(leafmod, "build_index", no_scan)
        again = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=7")
    assert again.client_sizes.tolist() == first.client_sizes.tolist()
    # rewrite one file with one user fewer: its index is stale (size, mtime) and rebuilt
    users = dict(list(train.items())[:-1])
    layouts.write_leaf(tmp_path / "train", users, 3, "train")
    changed = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=6")
    assert changed.client_sizes.tolist() == [len(u["y"]) for u in users.values()]


def test_unwritable_cache_still_loads(tmp_path):
    _femnist(tmp_path)
    (tmp_path / "idx").write_text("a file where the cache folder would be")
    data = _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=7")
    assert data.num_clients == 7


def test_non_ascii_text_keeps_byte_spans(tmp_path):
    # a raw UTF-8 file (ensure_ascii=False): character and byte offsets differ
    users = {"zoë": {"x": [[0.5, 1.5], [2.5, 3.5]], "y": [0, 1]}, "émile": {"x": [[4.0, 5.0]], "y": [2]}}
    doc = {"users": list(users), "num_samples": [2, 1], "user_data": users}
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    data = _load(tmp_path, tmp_path / "train", tmp_path / "train", FEMNIST_JOB, "data.num_clients=2")
    assert data.client(1)[0].tolist() == [[4.0, 5.0]] and data.client(0)[1].tolist() == [0, 1]


# --------------------------------------------------------------------------- bad files


def _doc() -> dict:
    return {
        "users": ["u0", "u1"],
        "num_samples": [2, 1],
        "user_data": {
            "u0": {"x": [[0.1, 0.2], [0.3, 0.4]], "y": [1, 2]},
            "u1": {"x": [[0.5, 0.6]], "y": [0]},
        },
    }


def _shakespeare_doc() -> dict:
    romeo = {"x": ["to be", "o be "], "y": ["o", "t"]}
    return {"users": ["ROMEO"], "num_samples": [2], "user_data": {"ROMEO": romeo}}


def _drop(d: dict, *path):
    *head, last = path
    for key in head:
        d = d[key]
    del d[last]


BAD = {
    # name: (make the document, the user named in the error or None, the key named in the error)
    "no users key": (lambda d: _drop(d, "users"), None, "'users'"),
    "no num_samples": (lambda d: _drop(d, "num_samples"), None, "'num_samples'"),
    "no user_data": (lambda d: _drop(d, "user_data"), None, "'user_data'"),
    "no x": (lambda d: _drop(d, "user_data", "u1", "x"), "u1", "'x'"),
    "no y": (lambda d: _drop(d, "user_data", "u0", "y"), "u0", "'y'"),
    "user without data": (lambda d: _drop(d, "user_data", "u1"), "u1", "user_data"),
    "ragged rows": (lambda d: d["user_data"]["u0"]["x"][1].append(0.9), "u0", "['x']"),
    "x and y lengths": (lambda d: d["user_data"]["u1"]["y"].append(3), "u1", "'y'"),
    "num_samples wrong": (lambda d: d["num_samples"].__setitem__(0, 5), "u0", "num_samples"),
    "empty user": (lambda d: d["user_data"]["u1"].update(x=[], y=[]), "u1", "user_data"),
    "float label": (lambda d: d["user_data"]["u1"].update(y=[0.5]), "u1", "['y']"),
    "negative label": (lambda d: d["user_data"]["u1"].update(y=[-1]), "u1", "['y']"),
    "unlisted user": (lambda d: d["user_data"].update(u2={"x": [[0.0, 0.0]], "y": [0]}), "u2", "'users'"),
    # the second user goes through the scan's fast path (brackets and commas, no floats parsed)
    "ragged rows, fast path": (lambda d: _two_rows(d, [[0.5, 0.6], [0.7]]), "u1", "['x']"),
    "empty row, fast path": (lambda d: _two_rows(d, [[0.5, 0.6], []]), "u1", "['x']"),
    "nested rows, fast path": (lambda d: d["user_data"]["u1"].update(x=[[[0.5, 0.6]]]), "u1", "['x']"),
    "string label, fast path": (lambda d: d["user_data"]["u1"].update(y=["a"]), "u1", "['y']"),
    "no y, fast path": (lambda d: _drop(d, "user_data", "u1", "y"), "u1", "'y'"),
    "strings in x, fast path": (lambda d: d["user_data"]["u1"].update(x=[["0.5", "0.6"]]), "u1", "'x'"),
}


def _two_rows(d: dict, x: list) -> None:
    d["user_data"]["u1"].update(x=x, y=[0, 1])
    d["num_samples"][1] = 2


def _romeo(d: dict) -> dict:
    return d["user_data"]["ROMEO"]


BAD_TEXT = {
    "letter outside the vocabulary": (lambda d: _romeo(d).update(y=["o", "~"]), "ROMEO", "['y']"),
    "x outside the vocabulary": (lambda d: _romeo(d)["x"].__setitem__(1, "o b\u00e9 "), "ROMEO", "['x']"),
    "ragged strings": (lambda d: _romeo(d)["x"].__setitem__(1, "o be"), "ROMEO", "['x']"),
    "y not one character": (lambda d: _romeo(d).update(y=["o", "th"]), "ROMEO", "['y']"),
}


@pytest.mark.parametrize("case", [*BAD, *BAD_TEXT])
def test_bad_file_names_file_user_and_key(tmp_path, case):
    make, user, key = BAD.get(case) or BAD_TEXT[case]
    doc = _doc() if case in BAD else _shakespeare_doc()
    make(doc)
    (tmp_path / "train").mkdir()
    bad = tmp_path / "train" / "all_data_0.json"
    bad.write_text(json.dumps(doc))
    layouts.write_leaf(tmp_path / "test", {"u0": _doc()["user_data"]["u0"]}, 1, "test")
    with pytest.raises(UserError) as err:
        _load(tmp_path, tmp_path / "train", tmp_path / "test", FEMNIST_JOB, "data.num_clients=1")
    message = str(err.value)
    assert message.startswith(f"data.path = {bad}: "), message
    assert key in message, message
    if user is not None:
        assert f"'{user}'" in message, message


def test_fast_scan_equals_full_parse(tmp_path, monkeypatch):
    users = layouts.femnist_users(5, (1, 4), seed=3)
    users['odd "id" \\'] = {"x": [[0.25] * 784], "y": [7], "raw": "a string ] with { brackets"}
    (path,) = layouts.write_leaf(tmp_path, users, 1, "train")
    fast = leafmod.build_index(path, "data.path")
    monkeypatch.setattr(leafmod, "_vector_user", lambda *args: None)
    assert leafmod.build_index(path, "data.path") == fast
    assert [u[0] for u in fast["users"]] == list(users) and fast["shape"] == [784]


def test_null_pixel_is_found_when_the_client_is_read(tmp_path):
    doc = _doc()
    doc["user_data"]["u1"]["x"] = [[None, 0.6]]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.json").write_text(json.dumps(doc))
    data = _load(tmp_path, tmp_path / "train", tmp_path / "train", FEMNIST_JOB, "data.num_clients=1")
    with pytest.raises(
        UserError, match=r"user 'u1': user_data\['u1'\]\['x'\] holds values that are not finite"
    ):
        _ = data.test


def test_non_utf8_text_names_the_user_and_the_key(tmp_path):
    (tmp_path / "train").mkdir()
    bad = tmp_path / "train" / "all_data_0.json"
    raw = json.dumps(_shakespeare_doc()).encode().replace(b'"to be"', b'"to b\xe9"')
    bad.write_bytes(raw)
    expected = re.escape(f"data.path = {bad}: user 'ROMEO'") + r".*\['x'\].*not UTF-8"
    with pytest.raises(UserError, match=expected):
        _load(tmp_path, tmp_path / "train", tmp_path / "train", SHAKESPEARE_JOB, "data.num_clients=1")


def test_invalid_json_and_missing_folder(tmp_path):
    (tmp_path / "train").mkdir()
    cut = '{"users": ["u0"], "num_samples": [1], "user_data": {"u0": {"x": [[1'  # a truncated file
    (tmp_path / "train" / "a.json").write_text(cut)
    with pytest.raises(UserError, match=r"user 'u0'.*invalid JSON"):
        _load(tmp_path, tmp_path / "train", tmp_path / "train", FEMNIST_JOB, "data.num_clients=1")
    layouts.write_leaf(tmp_path / "good", {"u0": _doc()["user_data"]["u0"]}, 1, "train")
    with pytest.raises(UserError, match="data.test_path = .*no such file or folder"):
        _load(tmp_path, tmp_path / "good", tmp_path / "nowhere", FEMNIST_JOB, "data.num_clients=1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"data.path = .*empty: no \*.json files"):
        _load(tmp_path, tmp_path / "empty", tmp_path / "good", FEMNIST_JOB, "data.num_clients=1")


def test_bad_file_is_exit_2_on_one_line(tmp_path):
    doc = _doc()
    _drop(doc, "user_data", "u1")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "all_data_0.json").write_text(json.dumps(doc))
    folder = tmp_path / "train"
    args = [
        f'data.path="{folder}"',
        f'data.test_path="{folder}"',
        f'data.options.index_cache="{tmp_path}/idx"',
    ]
    proc = hpcfed("check", FEMNIST_JOB, *args, "data.num_clients=1", "clients_per_round=1")
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcfed: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "user 'u1' is listed in 'users' but has no data in 'user_data'" in lines[0]


# --------------------------------------------------------------------------- it learns


@pytest.fixture
def one_thread():
    """Training in this process on one thread, as each rank does (two threads on a busy 2-core
    machine made a 10 s run take minutes)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_leaf_shakespeare_job_learns_above_unigram(tmp_path, one_thread):
    """LEAF's next-character task on the standard library's docstrings, one speaker per module:
    a small char_lstm beats always guessing the most frequent next character within 5 rounds."""
    corpus = layouts.stdlib_corpus(8, max_lines=40)
    train, test = layouts.shakespeare_users(corpus, test_every=10)
    layouts.write_leaf(tmp_path / "train", train, 2, "train")
    layouts.write_leaf(tmp_path / "test", test, 2, "test")
    job = load_job(SHAKESPEARE_JOB, [
        f'data.path="{tmp_path / "train"}"', f'data.test_path="{tmp_path / "test"}"', "data.num_clients=8",
        f'data.options.index_cache="{tmp_path / "idx"}"', f'out="{tmp_path / "runs"}"', "rounds=5",
        "clients_per_round=3", "eval_every=5", "checkpoint_every=5", "train.lr=3.0",
        'model.options={outputs="last", hidden_size=32}',
    ])  # fmt: skip
    run = run_in_process(job)
    y = run.data.test[1].numpy()
    unigram = np.bincount(y).max() / y.size  # the space
    accuracy = run.result.test_accuracy
    print(f"LEAF Shakespeare: accuracy {accuracy:.3f} after 5 rounds, unigram baseline {unigram:.3f}")
    assert accuracy > 1.4 * unigram, (accuracy, unigram)

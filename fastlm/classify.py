"""Text classification on fastlm's Transformer: a pooled head on the same blocks, fine-tuned in
full, with LoRA adapters, or with adapters on a quantized (int8/int4) frozen base.

    cfg = ClassifyConfig(data="data/20ng", out="runs/20ng-cls", init="runs/20ng-mlm", lora=8)
    train_classifier(cfg)                             # early stopping on the validation split
    model, info = load_classifier("runs/20ng-cls")    # the selected (best) checkpoint
    rep = evaluate(model, ids, labels, info)          # fastlm.metrics.report of a split

The encoder is a Transformer whose config has causal=False (bidirectional attention, padded keys
masked out) or, from a causal LM checkpoint, causal=True, where right padding is invisible to
every real token anyway. Pooling is the mean over real tokens or the first token (<|cls|>, which
fastlm.data.LabelledBatches puts in front of every sequence); a sequence's prediction does not
depend on how much padding its batch adds.

A run directory holds best/ (the checkpoint with the best validation score, which load_classifier
reads), last/ (what resuming reads: optimizer, RNG and sampler states too), metrics.jsonl,
curves.png and summary.json. Each checkpoint is checked by sha256 at load, as the LM trainer's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fastlm import data as fdata
from fastlm import metrics
from fastlm.backends import BACKENDS
from fastlm.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora, trainable_parameters
from fastlm.model import Transformer, TransformerConfig
from fastlm.patch import quantize_
from fastlm.train import (
    CheckpointError,
    _field,
    _read_json,
    _read_tensors,
    _reading,
    _write_checksums,
    load_model,
    rng_state,
    set_rng_state,
    verify_checkpoint,
)

POOLINGS = ("mean", "first")
CLASSIFIER_FILE = "classifier.json"


class TransformerClassifier(nn.Module):
    """logits (B, n_classes) = head(pool(encoder.hidden(ids, key_padding_mask)))."""

    def __init__(self, cfg: TransformerConfig, n_classes: int, pooling: str = "mean", dropout: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"TransformerClassifier: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"TransformerClassifier: n_classes must be an int >= 2, got {n_classes!r}")
        self.encoder = Transformer(cfg)
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        h = self.encoder.hidden(ids, key_padding_mask=mask)
        if self.pooling == "first":
            pooled = h[:, 0]
        else:
            w = mask.to(h.dtype)[..., None]
            pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.head(self.drop(pooled))


@dataclasses.dataclass
class ClassifyConfig:
    """One fine-tuning run. `fastlm train-classifier` has an option for every field."""

    data: str = _field("data/20newsgroups", "classification data directory written by `fastlm data --dataset`")
    out: str = _field("runs/20newsgroups-cls", "run directory: best/ and last/ checkpoints, metrics")
    init: str | None = _field(None, "start from this LM / MLM checkpoint or run directory (default: from scratch)")
    preset: str = _field("tiny", "model size when training from scratch", choices=tuple(TransformerConfig.PRESETS))
    model: dict = _field({}, "overrides of the preset's fields when training from scratch")
    pooling: str = _field("mean", "how token states become one vector", choices=POOLINGS)
    lora: int = _field(0, "LoRA rank of the attention and MLP matrices (base frozen); 0 = full fine-tuning")
    lora_alpha: float | None = _field(None, "LoRA alpha (default: twice the rank)")
    lora_embeddings: bool = _field(False, "with --lora, train the token embedding too (as PEFT's modules_to_save): "
                                          "what a small or briefly pretrained base lacks is mostly there")
    quant: str | None = _field(None, "quantize the frozen base's Linear weights (needs --lora)",
                               choices=("int8", "int4"))
    group_size: int = _field(128, "int4 group size along K", choices=(32, 64, 128))
    max_len: int = _field(256, "tokens per example, <|cls|> included; longer ones are cut", positive=True)
    long: str = _field("head", "a longer example: head = its first max_len - 1 tokens; windows = a random window "
                               "of them per step in training, and the mean of the probabilities of up to "
                               "--windows windows spanning it in prediction", choices=("head", "windows"))
    windows: int = _field(8, "most windows per example in prediction with --long windows", positive=True)
    batch_size: int = _field(32, "examples per optimizer step", positive=True)
    steps: int = _field(2000, "most optimizer steps", positive=True)
    lr: float = _field(1e-3, "peak learning rate")
    warmup: int = _field(50, "linear warm-up steps")
    weight_decay: float = _field(0.01, "AdamW weight decay of the matrices")
    dropout: float = _field(0.1, "dropout before the head")
    grad_clip: float = _field(1.0, "global gradient norm; 0 = no clipping")
    eval_every: int = _field(100, "steps between evaluations on the validation split", positive=True)
    patience: int = _field(5, "evaluations without a better validation score before stopping", positive=True)
    select: str = _field("accuracy", "the validation score that picks the checkpoint", choices=("accuracy",
                                                                                                 "macro_f1"))
    seed: int = _field(1337, "seed of the head, the batches and dropout")
    device: str | None = _field(None, "cpu, cuda ... (default: cuda when present, else cpu)")
    backend: str | None = _field(None, "fastlm backend for the model's ops (default: best available)",
                                 choices=BACKENDS)
    progress: bool = _field(True, "show a progress bar")

    def check(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("positive") and v is not None and v <= 0:
                raise ValueError(f"ClassifyConfig: {f.name} must be positive, got {v}")
            choices = f.metadata.get("choices")
            if choices and v is not None and v not in choices:
                raise ValueError(f"ClassifyConfig: {f.name} must be one of {', '.join(map(str, choices))}, got {v!r}")
        if self.lora < 0 or self.warmup < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("ClassifyConfig: lora, warmup, grad_clip and weight_decay must be >= 0")
        if self.lora_embeddings and not self.lora:
            raise ValueError("ClassifyConfig: lora_embeddings is for a LoRA run; full fine-tuning trains them anyway")
        if self.quant and not self.lora:
            raise ValueError("ClassifyConfig: a quantized base is frozen; give --lora RANK for adapters to train")
        if self.max_len < 2:
            raise ValueError(f"ClassifyConfig: max_len must be at least 2, got {self.max_len}")


# --- building and loading ----------------------------------------------------------------------------


def _adapt(model: TransformerClassifier, info: dict) -> None:
    """Quantize and add adapters as info says; norms and head (and the token embedding, if info
    says so) stay trainable with adapters."""
    q = info.get("quant")
    if q:
        quantize_(model.encoder, bits=q["bits"], group_size=q["group_size"])
    lo = info.get("lora")
    if lo:
        apply_lora(model.encoder, lo["rank"], lo["alpha"])
        for name, p in model.encoder.named_parameters():
            if ".norm" in f".{name}" and ".base." not in name:
                p.requires_grad_(True)
        if lo.get("embeddings"):
            model.encoder.wte.weight.requires_grad_(True)


def build(info: dict, where: Path = Path(CLASSIFIER_FILE)) -> TransformerClassifier:
    """The (untrained) classifier a classifier.json describes."""
    with _reading(where, "not a classifier description of this fastlm", KeyError, TypeError, ValueError):
        cfg = TransformerConfig.from_dict(info["model"])
        model = TransformerClassifier(cfg, len(info["labels"]), info["pooling"], info.get("dropout", 0.0))
        _adapt(model, info)
    return model


def _classifier_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    for cand in (p / "best", p):
        if (cand / CLASSIFIER_FILE).is_file():
            return cand
    if (p / "latest").is_file() or (p / "config.json").is_file():
        raise CheckpointError(f"{p}: a language-model checkpoint, not a classifier; train one with "
                              f"`fastlm train-classifier --init {p}`")
    raise CheckpointError(f"{p}: no classifier checkpoint here (no {CLASSIFIER_FILE}, nor best/{CLASSIFIER_FILE})")


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu", backend: str | None = None
                    ) -> tuple[TransformerClassifier, dict]:
    """The classifier of a run directory (its best/ checkpoint) or checkpoint, in eval mode, and
    its description (labels, pooling, max_len, ...; "dir" is the checkpoint directory)."""
    ckpt = _classifier_dir(path)
    verify_checkpoint(ckpt, [CLASSIFIER_FILE, "model.safetensors"])
    info = _read_json(ckpt / CLASSIFIER_FILE)
    if info.get("kind") != "classifier":
        raise CheckpointError(f"{ckpt / CLASSIFIER_FILE}: not a classifier checkpoint (kind {info.get('kind')!r})")
    info["model"] = {**info["model"], "backend": backend}
    model = build(info, ckpt / CLASSIFIER_FILE)
    state = _read_tensors(ckpt / "model.safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt / 'model.safetensors'}: does not match {CLASSIFIER_FILE} ({e})") from None
    return model.to(device).eval(), {**info, "dir": str(ckpt)}


def _init_info(cfg: ClassifyConfig, meta: dict) -> tuple[dict, dict | None]:
    """The classifier's description and, with --init, the pretrained encoder's weights."""
    state = None
    if cfg.init:
        lm, ckpt = load_model(cfg.init)
        model_cfg = lm.config
        data_tok, ckpt_tok = Path(cfg.data) / "tokenizer.json", ckpt / "tokenizer.json"
        if not ckpt_tok.exists() or ckpt_tok.read_bytes() != data_tok.read_bytes():
            raise ValueError(f"train_classifier: {ckpt_tok} is not the tokenizer of {cfg.data}; pretrain on the "
                             f"same data directory (`fastlm train-lm --data {cfg.data}`)")
        state = lm.state_dict()
    else:
        model_cfg = TransformerConfig.preset(cfg.preset, **{"vocab_size": meta["vocab_size"], "causal": False,
                                                            **cfg.model})
    if cfg.max_len > model_cfg.block_size:
        raise ValueError(f"train_classifier: max_len {cfg.max_len} exceeds the model's block_size "
                         f"{model_cfg.block_size}")
    info = {"kind": "classifier", "model": {**model_cfg.to_dict(), "backend": None}, "labels": meta["labels"],
            "dataset": meta.get("dataset"), "pooling": cfg.pooling, "dropout": cfg.dropout, "max_len": cfg.max_len,
            "windows": cfg.windows if cfg.long == "windows" else 1, "init": cfg.init,
            "lora": {"rank": cfg.lora, "alpha": cfg.lora_alpha or 2.0 * cfg.lora,
                     "embeddings": cfg.lora_embeddings} if cfg.lora else None,
            "quant": {"bits": 8 if cfg.quant == "int8" else 4, "group_size": cfg.group_size} if cfg.quant else None}
    return info, state


# --- evaluation ------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: TransformerClassifier, ids: list[list[int]], info: dict, meta: dict, batch_size: int = 64,
            device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, probabilities (N, C)) of each sequence, in the given order: of its first
    max_len - 1 tokens, or the mean over the windows that span it when info["windows"] > 1."""
    most, width = info.get("windows", 1), info["max_len"] - 1
    owner, pieces = [], []
    for i, s in enumerate(ids):
        w = fdata.windows(s, width, most) if most > 1 else [s]
        owner += [i] * len(w)
        pieces += w
    batches = fdata.LabelledBatches(pieces, [0] * len(pieces), batch_size, info["max_len"], cls_id=meta["cls_id"],
                                    pad_id=meta["pad_id"], shuffle=False)
    was = model.training
    model.eval()
    probs = np.zeros((len(pieces), len(info["labels"])), dtype=np.float64)
    for members in batches._order:
        x, m, _ = batches.collate(members, device)
        probs[members] = model(x, m).float().softmax(-1).cpu().numpy()
    model.train(was)
    if len(pieces) > len(ids):
        owner = np.asarray(owner)
        total = np.zeros((len(ids), probs.shape[1]))
        np.add.at(total, owner, probs)
        probs = total / np.bincount(owner, minlength=len(ids))[:, None]
    return probs.argmax(1), probs


def evaluate(model: TransformerClassifier, ids: list[list[int]], labels: list[int], info: dict, meta: dict,
             device="cpu") -> dict:
    """fastlm.metrics.report of the model on these examples."""
    pred, _ = predict(model, ids, info, meta, device=device)
    return metrics.report(labels, pred, info["labels"])


def check_labels(info: dict, meta: dict, where: str) -> None:
    if list(info["labels"]) != list(meta["labels"]):
        raise ValueError(f"{where}: the data's label set ({', '.join(meta['labels'])}) differs from the "
                         f"checkpoint's ({', '.join(info['labels'])})")


# --- checkpoints -------------------------------------------------------------------------------------------


def _save(dest: Path, model: TransformerClassifier, info: dict, tokenizer: Path, extra: dict | None = None) -> None:
    """Write dest whole under a temporary name, then rename it into place. extra: {"optimizer":
    opt, "trainer": {...}} for a resumable checkpoint."""
    from safetensors.torch import save_file

    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    # The trainable tensors alone (adapters, norms, head, the embedding if trained): what a LoRA
    # run adds to its base.
    if info.get("lora"):
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        save_file({k: v for k, v in state.items() if k in trained or k in lora_state_dict(model)},
                  str(tmp / "adapters.safetensors"))
    (tmp / CLASSIFIER_FILE).write_text(json.dumps({k: v for k, v in info.items() if k != "dir"}, indent=1) + "\n")
    shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    if extra:
        opt = extra["optimizer"].state_dict()
        tensors = {f"{i}.{k}": v.detach().contiguous().cpu() for i, st in opt["state"].items()
                   for k, v in st.items() if isinstance(v, Tensor)}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": opt["param_groups"]}) + "\n")
        (tmp / "trainer.json").write_text(json.dumps(extra["trainer"]) + "\n")
    _write_checksums(tmp)
    old = dest.parent / f".old-{dest.name}-{os.getpid()}"
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def merge_classifier(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write to out the classifier at path with its LoRA adapters merged into the weights
    (quantized again in the base's format when the base was quantized); returns out."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"merge-lora: {out} exists; give a new directory")
    model, info = load_classifier(path)
    if not info.get("lora"):
        raise ValueError(f"merge-lora: {info['dir']} has no LoRA adapters to merge")
    merge_lora(model.encoder)
    q = info.get("quant")
    if q:
        quantize_(model.encoder, bits=q["bits"], group_size=q["group_size"])
    src = Path(info["dir"])
    saved = _read_json(src / CLASSIFIER_FILE)  # as written, without the backend load_classifier set
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(out, model, {k: v for k, v in saved.items() if k != "lora"}, src / "tokenizer.json")
    return out


def _load_optimizer(opt: torch.optim.Optimizer, ckpt: Path) -> None:
    tensors = _read_tensors(ckpt / "optimizer.safetensors")
    meta = _read_json(ckpt / "optimizer.json")
    with _reading(ckpt / "optimizer.json", "does not match the model", KeyError, ValueError, IndexError):
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --- training ---------------------------------------------------------------------------------------------


def _lr(step: int, cfg: ClassifyConfig) -> float:
    """Linear warm-up, then linear decay to a tenth of lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (1.0 - 0.9 * frac)


def _optimizer(model: TransformerClassifier, cfg: ClassifyConfig) -> torch.optim.AdamW:
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in emb]
    rest = [p for p in params if p.dim() < 2 or id(p) in emb]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # The process's peak resident set (Linux reports KiB): weights, activations, optimizer, data.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclasses.dataclass
class _Run:
    cfg: ClassifyConfig
    info: dict
    meta: dict
    model: TransformerClassifier
    opt: torch.optim.AdamW
    batches: fdata.LabelledBatches
    val: tuple[list, list]
    device: torch.device
    step: int = 0
    best: float = -1.0
    best_step: int = 0
    bad: int = 0                    # evaluations since the best
    seconds: float = 0.0            # training time before this process (a resumed run)


def _start(cfg: ClassifyConfig) -> _Run:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _, train_ids, train_y, meta = fdata.load_labelled(cfg.data, "train")
    _, val_ids, val_y, _ = fdata.load_labelled(cfg.data, "val")
    info, state = _init_info(cfg, meta)
    torch.manual_seed(cfg.seed)
    model = TransformerClassifier(TransformerConfig.from_dict({**info["model"], "backend": cfg.backend}),
                                  len(info["labels"]), cfg.pooling, cfg.dropout)
    if state is not None:
        model.encoder.load_state_dict(state)
    _adapt(model, info)
    model.to(device)
    batches = fdata.LabelledBatches(train_ids, train_y, cfg.batch_size, cfg.max_len, cls_id=meta["cls_id"],
                                    pad_id=meta["pad_id"], seed=cfg.seed,
                                    crop="random" if cfg.long == "windows" else "head")
    return _Run(cfg, info, meta, model, _optimizer(model, cfg), batches, (val_ids, val_y), device)


def _step(r: _Run) -> float:
    cfg = r.cfg
    for g in r.opt.param_groups:
        g["lr"] = _lr(r.step, cfg)
    x, m, y = r.batches.next(r.device)
    loss = nn.functional.cross_entropy(r.model(x, m).float(), y)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in r.model.parameters() if p.requires_grad], cfg.grad_clip)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    r.step += 1
    return loss.item()


def _trainer_state(r: _Run, elapsed: float) -> dict:
    return {"step": r.step, "best": r.best, "best_step": r.best_step, "bad": r.bad, "seconds": elapsed,
            "config": dataclasses.asdict(r.cfg), "sampler": r.batches.state_dict(), "rng": rng_state()}


def _resume(r: _Run, out: Path) -> None:
    ckpt = out / "last"
    verify_checkpoint(ckpt, ["model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.json"])
    with _reading(ckpt / "model.safetensors", "does not match the run's model", RuntimeError):
        r.model.load_state_dict(_read_tensors(ckpt / "model.safetensors"))
    _load_optimizer(r.opt, ckpt)
    t = _read_json(ckpt / "trainer.json")
    with _reading(ckpt / "trainer.json", "not a trainer state of this fastlm", KeyError, TypeError, ValueError,
                  RuntimeError):
        r.step, r.best, r.best_step, r.bad, r.seconds = t["step"], t["best"], t["best_step"], t["bad"], t["seconds"]
        r.batches.load_state_dict(t["sampler"])
        set_rng_state(t["rng"])


def _evaluate_and_save(r: _Run, out: Path, row: dict, elapsed: float) -> bool:
    """Score the validation split, keep best/ and last/; True when patience has run out."""
    rep = evaluate(r.model, *r.val, r.info, r.meta, r.device)
    score = rep[r.cfg.select]
    row.update(val_accuracy=rep["accuracy"], val_macro_f1=rep["macro_f1"])
    tok = Path(r.cfg.data) / "tokenizer.json"
    if score > r.best:
        r.best, r.best_step, r.bad = score, r.step, 0
        _save(out / "best", r.model, {**r.info, "step": r.step, "val": {k: rep[k] for k in ("accuracy", "macro_f1")}},
              tok)
    else:
        r.bad += 1
    # Logged before last/ is written: a crash in between leaves a row that resuming drops.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    _save(out / "last", r.model, r.info, tok, {"optimizer": r.opt, "trainer": _trainer_state(r, elapsed)})
    return r.bad >= r.cfg.patience


def _loop(r: _Run, out: Path) -> tuple[float, bool]:
    from tqdm import tqdm

    cfg = r.cfg
    bar = tqdm(total=cfg.steps, initial=r.step, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    t0, losses, stopped = time.perf_counter(), [], False
    r.model.train()
    while r.step < cfg.steps and not stopped:
        losses.append(_step(r))
        bar.update(1)
        if r.step % cfg.eval_every and r.step != cfg.steps:
            continue
        elapsed = r.seconds + time.perf_counter() - t0
        row = {"step": r.step, "epoch": r.batches.epoch, "loss": float(np.mean(losses)), "lr": _lr(r.step - 1, cfg),
               "seconds": elapsed}
        losses = []
        stopped = _evaluate_and_save(r, out, row, elapsed)
        r.model.train()
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_acc=f"{row['val_accuracy']:.4f}")
        bar.write(f"step {r.step}: loss {row['loss']:.4f}, val accuracy {row['val_accuracy']:.4f}, "
                  f"macro-F1 {row['val_macro_f1']:.4f}" + (" (best)" if r.best_step == r.step else ""))
    bar.close()
    return r.seconds + time.perf_counter() - t0, stopped


def train_classifier(cfg: ClassifyConfig, resume: bool = False) -> dict:
    """Fine-tune (or resume); returns the summary: the selected step, its validation scores,
    trainable parameters, wall time and peak memory."""
    cfg.check()
    out = Path(cfg.out)
    r = _start(cfg)
    if resume and (out / "last" / "trainer.json").exists():
        _resume(r, out)
        _truncate(out / "metrics.jsonl", r.step)
        print(f"resuming {out} from step {r.step}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    total, trainable = sum(p.numel() for p in r.model.parameters()), trainable_parameters(r.model)
    kind = ("quantized base + LoRA" if cfg.quant else "LoRA") if cfg.lora else "full fine-tuning"
    print(f"classifier: {total / 1e6:.2f} M parameters, {trainable:,} trainable ({kind}); "
          f"{len(r.batches)} batches of {cfg.batch_size} per epoch; device {r.device}")
    seconds, stopped = _loop(r, out)
    summary = {"best_step": r.best_step, "select": cfg.select, "best": r.best, "steps": r.step,
               "early_stopped": stopped, "train_seconds": seconds, "peak_memory_mb": _peak_memory_mb(r.device),
               "parameters": total, "trainable_parameters": trainable, "mode": kind,
               "lora_layers": sum(isinstance(m, LoRALinear) for m in r.model.modules())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    png = plot_run(out / "metrics.jsonl", out / "curves.png")
    if png:
        print(f"wrote {png}")
    return summary


def _truncate(path: Path, step: int) -> None:
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def plot_run(metrics_path: Path, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in rows]
    a.plot(steps, [r["loss"] for r in rows], "o-")
    a.set_xlabel("step")
    a.set_ylabel("training cross-entropy")
    b.plot(steps, [r["val_accuracy"] for r in rows], "o-", label="accuracy")
    b.plot(steps, [r["val_macro_f1"] for r in rows], "s-", label="macro-F1")
    b.set_xlabel("step")
    b.set_ylabel("validation score")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# --- the classical baseline --------------------------------------------------------------------------------


def tfidf_baseline(data_dir: str | os.PathLike, C: float = 10.0, seed: int = 0) -> dict:
    """TF-IDF (word 1-2 grams, sublinear tf) + logistic regression on the same texts and split:
    C picked on the validation split from a small grid around the given one, then the model fit
    on the training part is scored on the test split. Needs scikit-learn (the classify extra)."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ImportError("the TF-IDF baseline needs scikit-learn: pip install 'fastlm[classify]'") from None
    t0 = time.perf_counter()
    train_x, _, train_y, meta = fdata.load_labelled(data_dir, "train")
    val_x, _, val_y, _ = fdata.load_labelled(data_dir, "val")
    test_x, _, test_y, _ = fdata.load_labelled(data_dir, "test")
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr = vec.fit_transform(train_x)
    xva, xte = vec.transform(val_x), vec.transform(test_x)
    best = None
    for c in (C / 10, C, C * 10):
        clf = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(xtr, train_y)
        acc = metrics.report(val_y, clf.predict(xva), meta["labels"])["accuracy"]
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    rep = metrics.report(test_y, best[2].predict(xte), meta["labels"])
    return {"C": best[1], "val_accuracy": best[0], "test": rep, "seconds": time.perf_counter() - t0}

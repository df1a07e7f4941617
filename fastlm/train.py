"""Train a Transformer on a prepared token stream (see fastlm.data.prepare).

    cfg = TrainConfig(data="data/shakespeare", out="runs/tiny", preset="tiny", steps=2000)
    train(cfg)                      # or resume=True to continue from runs/tiny/latest

AdamW with decoupled weight decay (not on norms, biases or embeddings), global-norm gradient
clipping, linear warm-up then cosine decay, gradient accumulation, bf16 autocast on CUDA, periodic
evaluation (loss, perplexity), a JSONL metrics log, a PNG of the curves, and checkpoints from
which a run resumes exactly. Under torchrun it trains with DDP (gloo on the CPU, nccl on GPUs) on
the same global batch: each process takes its share of every global batch and accumulates less.
With fsdp=True it uses FSDP2 instead (fully_shard on each block, then on the whole model): each
process keeps only its shard of the parameters, gradients and AdamW state.

A checkpoint is a directory written whole under a temporary name and renamed into place, after
which the `latest` file is replaced to point at it, so a crash at any moment leaves the previous
checkpoint intact. It holds the full (unsharded) state whether the run used one process, DDP or
FSDP, so any of them resumes from it:

    <out>/latest                    name of the newest complete checkpoint
    <out>/step_000200/model.safetensors, config.json          the model
                     optimizer.safetensors, optimizer.json    AdamW's tensors; its scalars
                     trainer.json                             step, RNG states, sampler, config
                     tokenizer.json                           copied from the data directory
                     checksums.json                           sha256 of each file above
    <out>/metrics.jsonl, <out>/curves.png

Nothing is loaded with pickle. Every file a load reads is checked against checksums.json first,
so a corrupt byte (a config edit that changes no tensor's shape, a dtype flipped in a header)
raises CheckpointError naming the file instead of loading a different model; the weights' dtypes
are also checked against the model's. A checkpoint written before checksums existed (no
checksums.json) still loads, with a warning that it cannot be verified.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastlm import data as fdata
from fastlm.backends import BACKENDS
from fastlm.model import Transformer, TransformerConfig


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt; the message names the file."""


DTYPES = ("auto", "fp32", "bf16")


def _field(default, help: str, **meta):
    """A TrainConfig field with the help `fastlm train-lm --help` shows for it. meta: positive=True
    (must be > 0 unless None), choices=(...) (one of them, or None)."""
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass
class TrainConfig:
    """One training run. `fastlm train-lm` has an option for every field (`--batch-size` sets
    batch_size, `--no-progress` clears progress) with these defaults, which the README's
    Shakespeare run uses. None in micro_batch_size and min_lr means a default that follows other
    fields; resolved() fills it in."""

    data: str = _field("data/shakespeare", "token directory written by `fastlm data`")
    out: str = _field("runs/tiny", "run directory: checkpoints, metrics")
    preset: str = _field("tiny", "model size", choices=tuple(TransformerConfig.PRESETS))
    objective: str = _field("clm", "clm: next-token prediction, causal; mlm: BERT's masked tokens (15%%, 80/10/10), "
                                   "bidirectional, on a directory of `fastlm data --dataset`", choices=("clm", "mlm"))
    model: dict = _field({}, "overrides of the preset's fields, e.g. {\"pos\": \"rope\", \"n_kv_head\": 2}")
    steps: int = _field(1000, "optimizer steps", positive=True)
    batch_size: int = _field(16, "sequences per optimizer step, over all processes", positive=True)
    micro_batch_size: int | None = _field(None, "sequences per forward/backward in one process "
                                                "(default: the batch size)", positive=True)
    seq_len: int | None = _field(None, "tokens per sequence (default: the model's block size)", positive=True)
    lr: float = _field(2e-3, "peak learning rate")
    min_lr: float | None = _field(None, "final learning rate (default: lr / 10)")
    warmup: int = _field(50, "linear warm-up steps")
    weight_decay: float = _field(0.1, "AdamW weight decay of the Linear matrices")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(1.0, "global gradient norm; 0 = no clipping")
    eval_every: int = _field(100, "steps between evaluations", positive=True)
    eval_batches: int = _field(5, "validation batches per evaluation", positive=True)
    ckpt_every: int = _field(100, "steps between checkpoints; 0 = only the final one")
    keep: int = _field(2, "checkpoints kept on disk", positive=True)
    log_every: int = _field(10, "steps between rows of metrics.jsonl", positive=True)
    seed: int = _field(1337, "seed of the weights, the batches and dropout")
    device: str | None = _field(None, "cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")
    dtype: str = _field("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU", choices=DTYPES)
    backend: str | None = _field(None, "fastlm backend for the model's ops (default: best available)",
                                 choices=BACKENDS)
    compile: bool = _field(False, "torch.compile the model")
    fsdp: bool = _field(False, "under torchrun, shard parameters, gradients and optimizer state (FSDP2) "
                               "instead of replicating them (DDP)")
    progress: bool = _field(True, "show a progress bar")

    def resolved(self) -> TrainConfig:
        """This config with micro_batch_size and min_lr filled in where None, checked."""
        cfg = dataclasses.replace(
            self, micro_batch_size=self.batch_size if self.micro_batch_size is None else self.micro_batch_size,
            min_lr=self.lr / 10 if self.min_lr is None else self.min_lr)
        cfg.check()
        return cfg

    def check(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("positive") and v is not None and v <= 0:
                raise ValueError(f"TrainConfig: {f.name} must be positive, got {v}")
            choices = f.metadata.get("choices")
            if choices and v is not None and v not in choices:
                raise ValueError(f"TrainConfig: {f.name} must be one of {', '.join(choices)}, got {v!r}")
        if self.ckpt_every < 0 or self.warmup < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig: ckpt_every, warmup, grad_clip and weight_decay must be >= 0")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig: need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")


# --- pieces ------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay to min_lr at cfg.steps."""
    if cfg.min_lr is None:
        cfg = cfg.resolved()
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on the matrices of Linear layers (not norms, biases, embeddings)."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in no_decay]
    rest = [p for p in model.parameters() if p.dim() < 2 or id(p) in no_decay]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # torch's fused step makes one pass over each parameter and its state, on the CPU too: 26 ms
    # for the small preset's 23 M parameters here, against 91 ms for the default (foreach) path.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def _setup_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank); initialises the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _mean_over_ranks(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world


# --- RNG states as JSON ---------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py[0], list(py[1]), py[2]],
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(_unb64(s["torch"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(x) for x in s["cuda"]])
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# --- checkpoints ---------------------------------------------------------------------------------


@contextmanager
def _reading(path: Path, problem: str, *errors: type[Exception]):
    """Report `errors` raised while loading what `path` holds as a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except errors as e:
        raise CheckpointError(f"{path}: {problem} ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON, the checkpoint is corrupt or truncated ({e})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file, the checkpoint is corrupt or "
                              f"truncated ({e})") from None


CHECKSUMS = "checksums.json"
# What resuming reads (tokenizer.json is only copied along).
RESUME_FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_checksums(ckpt: Path) -> None:
    sums = {f.name: _sha256(f) for f in sorted(ckpt.iterdir()) if f.is_file() and f.name != CHECKSUMS}
    (ckpt / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1) + "\n")


def verify_checkpoint(ckpt: Path, names: list[str]) -> None:
    """Check the files `names` of ckpt against its checksums.json: CheckpointError naming the
    first that differs or is missing; a warning, and no check, for a checkpoint without one."""
    sums_path = ckpt / CHECKSUMS
    if not sums_path.exists():
        warnings.warn(f"{ckpt}: no {CHECKSUMS} (a checkpoint from an older fastlm); its files cannot be "
                      "verified and are loaded as they are", stacklevel=3)
        return
    sums = _read_json(sums_path).get("sha256")
    if not isinstance(sums, dict):
        raise CheckpointError(f"{sums_path}: not a checksum file of this fastlm (no 'sha256' table)")
    bad = []
    for name in names:
        path = ckpt / name
        if name not in sums:
            raise CheckpointError(f"{path}: not listed in {CHECKSUMS}, so it cannot be verified")
        if not path.exists():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        if _sha256(path) != sums[name]:
            bad.append(name)
    if bad:
        # Which files are intact tells a reader what can still be trusted (the weights, say).
        good = [n for n in names if n not in bad]
        raise CheckpointError(
            f"{ckpt / bad[0]}: its sha256 differs from the one in {CHECKSUMS}: the file is corrupt or was edited "
            f"after the checkpoint was written (differing: {', '.join(bad)}; intact: {', '.join(good) or 'none'})")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, given it or a run directory holding `latest`."""
    p = Path(path)
    if (p / "latest").is_file():
        name = (p / "latest").read_text().strip()
        if not name or not (p / name).is_dir():
            raise CheckpointError(f"{p / 'latest'}: points at {name!r}, which is not a checkpoint directory")
        return p / name
    if (p / "model.safetensors").exists() or (p / "config.json").exists():
        return p
    raise CheckpointError(f"{p}: no checkpoint here (neither a `latest` file nor model.safetensors)")


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _param_names(model: Transformer, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in torch.optim's numbering (group after group), which the
    checkpoint's optimizer files use; torch.distributed.checkpoint names them instead."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _full_state(model: Transformer, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's and optimizer's state on the CPU, the optimizer's numbered as torch.optim
    numbers it. A collective under FSDP, which gathers the shards; only rank 0 receives them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model, options=_state_options())
    opt_state = get_optimizer_state_dict(model, opt, options=_state_options())
    if not opt_state:
        return model_state, opt_state
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    return model_state, {"state": {index[n]: st for n, st in opt_state["state"].items()},
                         "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                          for g in opt_state["param_groups"]]}


def save_checkpoint(out: Path, step: int, model_state: dict, model_config: TransformerConfig, opt_state: dict,
                    trainer: dict, tokenizer: Path | None, keep: int) -> Path:
    """Write out/step_<step> whole under a temporary name, then point `latest` at it; keep the
    newest `keep` checkpoints."""
    from safetensors.torch import save_file

    name = f"step_{step:06d}"
    tmp = out / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(model_state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(model_config.to_dict(), indent=1) + "\n")
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": opt_state["param_groups"],
                                                    "scalars": scalars}) + "\n")
    (tmp / "trainer.json").write_text(json.dumps(trainer) + "\n")
    if tokenizer is not None and tokenizer.exists():
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    _write_checksums(tmp)
    final = out / name
    if final.exists():  # left by a run that crashed before updating `latest`
        shutil.rmtree(final)
    os.replace(tmp, final)
    (out / "latest.tmp").write_text(name + "\n")
    os.replace(out / "latest.tmp", out / "latest")
    for old in sorted(out.glob("step_*"))[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_config(ckpt: Path, backend: str | None) -> TransformerConfig:
    with _reading(ckpt / "config.json", "not a valid model configuration", TypeError, ValueError):
        return TransformerConfig.from_dict({**_read_json(ckpt / "config.json"), "backend": backend})


def _load_weights(model: Transformer, ckpt: Path) -> None:
    """The checkpoint's full weights into the model, each process keeping its shard under FSDP."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = _read_tensors(ckpt / "model.safetensors")
    # set_model_state_dict copies into the parameters, converting any dtype (integers included).
    for name, want in model.state_dict().items():
        got = state.get(name)
        if got is not None and got.dtype != want.dtype:
            raise CheckpointError(f"{ckpt / 'model.safetensors'}: tensor {name!r} is {got.dtype}, "
                                  f"but the model's is {want.dtype}")
    with _reading(ckpt / "model.safetensors", "does not match config.json", RuntimeError, KeyError, ValueError):
        set_model_state_dict(model, state, options=_state_options())


def _load_optimizer(model: Transformer, opt: torch.optim.Optimizer, ckpt: Path) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    tensors = _read_tensors(ckpt / "optimizer.safetensors")
    meta = _read_json(ckpt / "optimizer.json")
    with _reading(ckpt / "optimizer.json", "does not match the model", ValueError, KeyError, IndexError,
                  RuntimeError):
        names = _param_names(model, opt)
        state: dict[str, dict] = {}
        for key, v in [*tensors.items(), *meta["scalars"].items()]:
            idx, name = key.split(".", 1)
            state.setdefault(names[int(idx)], {})[name] = v
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in meta["param_groups"]]
        set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups}, options=_state_options())


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", backend: str | None = None
               ) -> tuple[Transformer, Path]:
    """The model of a checkpoint (or of a run directory's latest one), in eval mode; and the
    checkpoint directory."""
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt, ["config.json", "model.safetensors"])
    model = Transformer(_load_config(ckpt, backend))
    _load_weights(model, ckpt)
    return model.to(device).eval(), ckpt


# --- one process's run ---------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model, tokens, cfg: TrainConfig, seq_len: int, device, rank: int, world: int,
             mlm: dict | None = None) -> float:
    """Mean loss over cfg.eval_batches global batches of the validation stream, the same batches
    (and, for the MLM objective, the same masks) at every evaluation (a fixed seed)."""
    batches = fdata.TokenBatches(tokens, cfg.batch_size, seq_len, seed=cfg.seed + 1, rank=rank, world=world)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2 + rank)
    was = model.training
    model.eval()
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = _objective(batches.next(device), mlm, gen)
        for xm, ym in zip(x.split(cfg.micro_batch_size), y.split(cfg.micro_batch_size)):
            with _autocast(device, cfg.dtype):
                total += float(model(xm, ym)[1]) * len(xm)
    model.train(was)
    return _mean_over_ranks(total / (cfg.eval_batches * cfg.batch_size // world), world)


@dataclasses.dataclass
class _Run:
    """What one process of a training run holds."""

    cfg: TrainConfig                # resolved
    rank: int
    world: int
    device: torch.device
    model: Transformer              # sharded in place under FSDP
    run: torch.nn.Module            # what is called: the model, or DDP around it; compiled if cfg.compile
    opt: torch.optim.AdamW
    batches: fdata.TokenBatches
    val_tokens: np.ndarray
    seq_len: int
    accum: int                      # micro-batches per step in this process
    step: int = 0
    mlm: dict | None = None         # mlm_mask's token ids for the MLM objective


def _resumed_config(cfg: TrainConfig, saved: dict, ckpt: Path) -> TrainConfig:
    """The stored run defines everything but the length of training, the progress bar and
    whether the model is sharded (a checkpoint holds the full state either way)."""
    with _reading(ckpt / "trainer.json", "not a trainer state of this fastlm", KeyError, TypeError):
        return TrainConfig(**{**saved["train_config"], "steps": cfg.steps, "progress": cfg.progress,
                              "fsdp": cfg.fsdp})


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _model_config(cfg: TrainConfig, ckpt: Path | None) -> tuple[TransformerConfig, int]:
    """The model's configuration (the checkpoint's, or the preset's with overrides) and seq_len."""
    meta = fdata.read_meta(cfg.data)
    if ckpt is not None:
        model_cfg = _load_config(ckpt, cfg.backend)
    else:
        model_cfg = TransformerConfig.preset(cfg.preset, **{"vocab_size": meta["vocab_size"],
                                                            "causal": cfg.objective == "clm", **cfg.model,
                                                            "backend": cfg.backend})
    if model_cfg.causal != (cfg.objective == "clm"):
        kind = "causal" if cfg.objective == "clm" else "bidirectional"
        raise ValueError(f"train: the {cfg.objective} objective needs a {kind} model, the configuration has "
                         f"causal={model_cfg.causal}")
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise ValueError(f"train: the data's vocabulary ({meta['vocab_size']}) exceeds the model's "
                         f"vocab_size ({model_cfg.vocab_size})")
    seq_len = cfg.seq_len or model_cfg.block_size
    if seq_len > model_cfg.block_size:
        raise ValueError(f"train: seq_len {seq_len} exceeds the model's block_size {model_cfg.block_size}")
    return model_cfg, seq_len


def _mlm_params(cfg: TrainConfig) -> dict | None:
    if cfg.objective == "clm":
        return None
    meta = fdata.read_meta(cfg.data)
    if "mask_id" not in meta:
        raise ValueError(f"train: the mlm objective needs a mask token, which {cfg.data} lacks; write a directory "
                         "with one: `fastlm data --dataset 20newsgroups --out DIR`")
    return {"mask_id": meta["mask_id"], "vocab_size": meta["vocab_size"], "n_special": meta["n_special"]}


def _objective(batch: tuple[torch.Tensor, torch.Tensor], mlm: dict | None, generator=None):
    """(inputs, targets): the next tokens for the causal objective; for the MLM one the window
    itself, corrupted, with its chosen tokens as targets."""
    if mlm is None:
        return batch
    return fdata.mlm_mask(batch[0], generator=generator, **mlm)


def _start(cfg: TrainConfig, ckpt: Path | None, rank: int, world: int, local_rank: int) -> _Run:
    """Model, optimizer and batches of a fresh run (a resumed one then loads its state into them)."""
    device = _device(cfg, local_rank)
    per_rank = cfg.batch_size // world
    if cfg.batch_size % world or per_rank % cfg.micro_batch_size:
        raise ValueError(f"train: batch_size {cfg.batch_size} must split into {world} process(es) x whole "
                         f"micro-batches of {cfg.micro_batch_size}")
    model_cfg, seq_len = _model_config(cfg, ckpt)
    # Every process builds the same initial model; DDP would broadcast rank 0's anyway, and under
    # FSDP each keeps its shard of it.
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    run = _distribute(model, cfg, device, world)
    opt = make_optimizer(model, cfg, device)  # after fully_shard, which replaces the parameters
    if cfg.compile:
        run = torch.compile(run)
    # Dropout masks should differ between processes.
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    batches = fdata.TokenBatches(fdata.load_tokens(cfg.data, "train"), cfg.batch_size, seq_len, seed=cfg.seed,
                                 rank=rank, world=world)
    return _Run(cfg, rank, world, device, model, run, opt, batches, fdata.load_tokens(cfg.data, "val"), seq_len,
                per_rank // cfg.micro_batch_size, mlm=_mlm_params(cfg))


def _distribute(model: Transformer, cfg: TrainConfig, device: torch.device, world: int) -> torch.nn.Module:
    """What the loop calls: the model itself, sharded in place by FSDP2, or wrapped by DDP."""
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        # One all-gather per block in the forward and backward (each block touches only its own
        # parameters), then the root for the embeddings and the final norm.
        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _restore(r: _Run, ckpt: Path, saved: dict) -> None:
    """Weights, optimizer state, step, RNG states and sampler position of a checkpoint."""
    _load_weights(r.model, ckpt)
    _load_optimizer(r.model, r.opt, ckpt)
    # A truncated or edited RNG state makes torch raise RuntimeError, NumPy and random ValueError.
    with _reading(ckpt / "trainer.json", "not a trainer state of this fastlm", KeyError, TypeError, ValueError,
                  IndexError, RuntimeError):
        r.step = saved["step"]
        rngs = saved["rng"]
        set_rng_state(rngs[r.rank] if r.rank < len(rngs) else rngs[0])
        r.batches.load_state_dict(saved["sampler"])


def _grad_sync(r: _Run, last: bool):
    """Gradients are averaged across processes only on a step's last micro-batch."""
    if r.world > 1 and r.cfg.fsdp:
        r.model.set_requires_gradient_sync(last)
    elif r.world > 1 and not last:
        return r.run.no_sync()
    return nullcontext()


def _optimizer_step(r: _Run, lr: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step on the next global batch: (the micro-batches' summed loss, the gradient norm
    before clipping, or None without clipping)."""
    cfg = r.cfg
    for g in r.opt.param_groups:
        g["lr"] = lr
    # The MLM masks come from the global RNG, which checkpoints carry: a resume draws the same.
    x, y = _objective(r.batches.next(r.device), r.mlm)
    loss_sum = torch.zeros((), device=r.device)
    for i, (xm, ym) in enumerate(zip(x.split(cfg.micro_batch_size), y.split(cfg.micro_batch_size))):
        with _grad_sync(r, last=i == r.accum - 1), _autocast(r.device, cfg.dtype):
            _, loss = r.run(xm, ym)
            (loss / r.accum).backward()
        loss_sum += loss.detach()
    grad_norm = None
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.grad_clip)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    r.step += 1
    return loss_sum, grad_norm


def _checkpoint(r: _Run, out: Path) -> None:
    """Every process sends its RNG states; rank 0 writes the checkpoint."""
    rngs = [rng_state()]
    if r.world > 1:
        rngs = [None] * r.world
        dist.all_gather_object(rngs, rng_state())
    model_state, opt_state = _full_state(r.model, r.opt)
    if r.rank == 0:
        trainer = {"step": r.step, "train_config": dataclasses.asdict(r.cfg), "rng": rngs,
                   "sampler": r.batches.state_dict(), "world": r.world}
        save_checkpoint(out, r.step, model_state, r.model.config, opt_state, trainer,
                        Path(r.cfg.data) / "tokenizer.json", r.cfg.keep)
    if r.world > 1:
        dist.barrier()


# --- the loop ------------------------------------------------------------------------------------


def plot_metrics(metrics: Path, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows a crashed run logged after the checkpoint it resumes from."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def _loop(r: _Run, out: Path) -> dict:
    """Steps until cfg.steps, logging, evaluating and checkpointing on schedule; the last row."""
    from tqdm import tqdm

    cfg, main = r.cfg, r.rank == 0
    bar = tqdm(total=cfg.steps, initial=r.step, disable=not (main and cfg.progress), unit="step", dynamic_ncols=True)
    last: dict = {}
    t0, tokens_since = time.perf_counter(), 0
    r.model.train()
    while r.step < cfg.steps:
        lr = lr_at(r.step, cfg)
        loss_sum, grad_norm = _optimizer_step(r, lr)
        tokens_since += cfg.batch_size * r.seq_len
        bar.update(1)
        final = r.step == cfg.steps
        row: dict = {}
        if r.step % cfg.log_every == 0 or final:
            row = {"step": r.step, "loss": _mean_over_ranks(float(loss_sum) / r.accum, r.world), "lr": lr,
                   "tokens_per_s": tokens_since / (time.perf_counter() - t0)}
            if grad_norm is not None:  # a DTensor under FSDP
                row["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            t0, tokens_since = time.perf_counter(), 0
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if r.step % cfg.eval_every == 0 or final:
            val = evaluate(r.run, r.val_tokens, cfg, r.seq_len, r.device, r.rank, r.world, r.mlm)
            row = {"step": r.step, **row, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
            if main:
                bar.write(f"step {r.step}: val loss {val:.4f}, perplexity {row['val_ppl']:.2f}")
        if row and main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            last = row
        if (cfg.ckpt_every and r.step % cfg.ckpt_every == 0) or final:
            _checkpoint(r, out)
    bar.close()
    return last


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) training; returns the last logged metrics."""
    rank, world, local_rank = _setup_distributed()
    out = Path(cfg.out)
    ckpt = resolve_checkpoint(out) if resume and (out / "latest").exists() else None
    if ckpt is not None:
        verify_checkpoint(ckpt, list(RESUME_FILES))
        saved = _read_json(ckpt / "trainer.json")
        cfg = _resumed_config(cfg, saved, ckpt)
    cfg = cfg.resolved()
    r = _start(cfg, ckpt, rank, world, local_rank)
    main = rank == 0
    if ckpt is not None:
        _restore(r, ckpt, saved)
        if main:
            _truncate_metrics(out / "metrics.jsonl", r.step)
            print(f"resuming {out} from step {r.step} ({ckpt.name})")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        m = r.model.config
        print(f"model: {r.model.num_params() / 1e6:.2f} M parameters, {m.n_layer} layers, d_model {m.d_model}; "
              f"{world} process(es) x {r.accum} micro-batch(es) of {cfg.micro_batch_size} x {r.seq_len} tokens "
              f"per step; device {r.device}" + (", FSDP" if world > 1 and cfg.fsdp else ""))
    last = _loop(r, out)
    if main and (out / "metrics.jsonl").exists():
        png = plot_metrics(out / "metrics.jsonl", out / "curves.png")
        if png:
            print(f"wrote {png}")
    return last

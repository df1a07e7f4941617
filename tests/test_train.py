"""The trainer: schedule, optimizer groups, checkpoints (exact resume after SIGKILL, corrupt files
caught), DDP and FSDP equal one process, and the CLI end to end."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data import synthetic_docs

from fastlm import cli, data
from fastlm import train as ftrain
from fastlm.model import Transformer, TransformerConfig

MODEL = {"n_layer": 2, "d_model": 64, "n_head": 4, "block_size": 32}


pytestmark = pytest.mark.usefixtures("one_thread")

# torchrun gives rank 1 cuda:1 wherever CUDA is present; on the CPU the two processes use gloo.
two_processes = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                   reason="two processes on CUDA need two GPUs")
# Exact resumes compare losses bit for bit: on the CPU, where no kernel accumulates with atomics
# in a varying order (the GPU kernels' fast paths do); what they test is the trainer's state.
EXACT = "cpu"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    data.prepare(d, vocab_size=300, val_fraction=0.2, docs=synthetic_docs(12, 600))
    return d


def _config(corpus, out, **kw) -> ftrain.TrainConfig:
    base = dict(data=str(corpus), out=str(out), model=MODEL, steps=6, batch_size=4, micro_batch_size=2,
                seq_len=32, warmup=2, eval_every=3, eval_batches=2, ckpt_every=3, log_every=1, progress=False)
    return ftrain.TrainConfig(**{**base, **kw})


def _cli_args(corpus, out, *extra) -> list[str]:
    return ["train-lm", "--data", str(corpus), "--out", str(out), "--model", json.dumps(MODEL),
            "--batch-size", "8", "--micro-batch-size", "2", "--seq-len", "32", "--warmup", "5",
            "--log-every", "1", "--eval-every", "1000", "--eval-batches", "1", "--no-progress", *extra]


def _run_cli(args, launcher=(), **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *launcher, "-m", "fastlm.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_lr_warms_up_then_decays_to_min():
    cfg = ftrain.TrainConfig(lr=1.0, min_lr=0.1, warmup=10, steps=110)
    lrs = [ftrain.lr_at(s, cfg) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = Transformer(TransformerConfig(vocab_size=64, **MODEL))
    opt = ftrain.make_optimizer(model, ftrain.TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        should = p.dim() == 2 and not name.startswith(("wte", "wpe"))
        assert (id(p) in decayed) == should, name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_checkpoint_round_trip_and_in_process_resume(corpus, tmp_path):
    whole = tmp_path / "whole"
    ftrain.train(_config(corpus, whole, device=EXACT))
    half = tmp_path / "half"
    ftrain.train(_config(corpus, half, steps=3, device=EXACT))
    ftrain.train(_config(corpus, half, device=EXACT), resume=True)
    assert _losses(half) == _losses(whole)
    assert (whole / "latest").read_text().strip() == "step_000006"
    assert sorted(p.name for p in whole.glob("step_*")) == ["step_000003", "step_000006"]
    assert (whole / "curves.png").stat().st_size > 0
    model, ckpt = ftrain.load_model(whole)
    assert (ckpt / "tokenizer.json").exists()
    ids = torch.randint(0, 300, (1, 10))
    ref, _ = ftrain.load_model(half)
    torch.testing.assert_close(model(ids)[0], ref(ids)[0], rtol=0, atol=0)


def test_corrupt_or_missing_checkpoint_files_are_named(corpus, tmp_path):
    out = tmp_path / "run"
    ftrain.train(_config(corpus, out, steps=3))
    ckpt = out / "step_000003"
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ftrain.CheckpointError, match="model.safetensors"):
        ftrain.load_model(out)
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ftrain.CheckpointError, match="model.safetensors"):
        ftrain.load_model(out)
    (ckpt / "model.safetensors").write_bytes(weights)
    ftrain.load_model(out)
    (ckpt / "trainer.json").write_text('{"step": 3, "rng"')
    with pytest.raises(ftrain.CheckpointError, match="trainer.json"):
        ftrain.train(_config(corpus, out), resume=True)
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 300, "d_model": 48}))
    with pytest.raises(ftrain.CheckpointError, match="model.safetensors"):
        ftrain.load_model(out)
    (out / "latest").write_text("step_999999\n")
    with pytest.raises(ftrain.CheckpointError, match="latest"):
        ftrain.load_model(out)
    with pytest.raises(ftrain.CheckpointError, match="no checkpoint"):
        ftrain.load_model(tmp_path / "nothing")


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    steps = ["--steps", "60", "--ckpt-every", "5", "--device", EXACT]
    killed = tmp_path / "killed"
    child = _run_cli(_cli_args(corpus, killed, *steps))
    deadline = time.monotonic() + 300
    # Kill it once it has written a few checkpoints, in the middle of training.
    while time.monotonic() < deadline and child.poll() is None:
        latest = killed / "latest"
        if latest.exists() and int(latest.read_text().split("_")[1]) >= 10:
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stopped_at = int((killed / "latest").read_text().split("_")[1])
    assert stopped_at < 60
    resumed = _run_cli(_cli_args(corpus, killed, *steps, "--resume"))
    # The uninterrupted run, in this process (one thread, as the children) while the resumed one runs.
    assert cli.main(_cli_args(corpus, tmp_path / "ref", *steps)) == 0
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resuming {killed} from step {stopped_at}" in out
    a, b = _losses(tmp_path / "ref"), _losses(killed)
    assert len(a) == 60 and a == b  # exactly, step by step


def _torchrun(args) -> subprocess.Popen:
    return _run_cli(args, launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])


@pytest.mark.slow
@two_processes
def test_two_process_ddp_matches_one_process(corpus, tmp_path):
    ddp = _torchrun(_cli_args(corpus, tmp_path / "ddp", "--steps", "4", "--backend", "torch"))
    assert cli.main(_cli_args(corpus, tmp_path / "one", "--steps", "4", "--backend", "torch")) == 0
    out, _ = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, out
    assert "2 process(es) x 2 micro-batch(es)" in out
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "ddp")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


# Two runs in one launch of two processes (a second launch would double the test's time): steps
# 0-1, then a resume from that checkpoint to step 4.
_STOP_AND_RESUME = """
import sys
import torch.distributed as dist
from fastlm import cli, train
args = cli.parser().parse_args(sys.argv[1:])
train.train(cli.train_config(args), resume=args.resume)
args.steps, args.resume = 4, True
train.train(cli.train_config(args), resume=args.resume)
dist.destroy_process_group()
"""


@pytest.mark.slow
@two_processes
def test_two_process_fsdp_matches_one_process(corpus, tmp_path):
    """FSDP2 on two processes (gloo) ends where one process does, through a checkpoint halfway:
    the shards gathered into the usual full files, then loaded back into shards. The first four
    steps are all warm-up, so stopping at step 2 leaves the learning rates as they were."""
    opts = ["--backend", "torch", "--ckpt-every", "2"]
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    script = tmp_path / "stop_and_resume.py"
    script.write_text(_STOP_AND_RESUME)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), *_cli_args(corpus, fsdp, "--steps", "2", "--fsdp", *opts)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert cli.main(_cli_args(corpus, one, "--steps", "4", *opts)) == 0
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert "2 process(es) x 2 micro-batch(es)" in out and "FSDP" in out
    assert f"resuming {fsdp} from step 2" in out
    a, b = _losses(one), _losses(fsdp)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    for name in ("model.safetensors", "optimizer.safetensors"):
        ref, got = (load_file(d / "step_000004" / name) for d in (one, fsdp))
        assert ref.keys() == got.keys(), name
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    assert (fsdp / "step_000004" / "optimizer.json").read_text() == (one / "step_000004" / "optimizer.json").read_text()


def test_cli_train_generate_eval(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_cli_args(corpus, out, "--steps", "3")) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--ckpt", str(out), "--prompt", "the king", "--max-new-tokens", "5",
                     "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the king")
    assert cli.main(["generate", "--ckpt", str(out), "--prompt", "the king", "--max-new-tokens", "5",
                     "--temperature", "0", "--no-cache"]) == 0
    assert cli.main(["eval", "--ckpt", str(out), "--data", str(corpus), "--batches", "2"]) == 0
    loss = float(capsys.readouterr().out.split("val loss ")[1].split(",")[0])
    assert 0 < loss < math.log(300) + 1
    # The same batches through int8 weights: a different model, but hardly a different loss.
    assert cli.main(["eval", "--ckpt", str(out), "--data", str(corpus), "--batches", "2", "--quant", "int8"]) == 0
    text = capsys.readouterr().out
    assert "int8 weights" in text
    qloss = float(text.split("val loss ")[1].split(",")[0])
    assert abs(qloss - loss) < 0.01 * loss


def test_cli_bad_arguments_are_clear(corpus, tmp_path, capsys):
    assert cli.main(["generate", "--ckpt", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(["train-lm", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "fastlm data" in capsys.readouterr().err
    assert cli.main(_cli_args(corpus, tmp_path / "o", "--batch-size", "3")) == 2
    assert "batch_size" in capsys.readouterr().err
    assert cli.main(_cli_args(corpus, tmp_path / "o", "--model", "[1]")) == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train-lm", "--steps", "0"])
    assert "positive" in capsys.readouterr().err


# --- checksums, dtypes and configs of checkpoints ---------------------------------------------


@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "run"
    ftrain.train(_config(corpus, out, steps=3))
    return out


def _copy_run(saved_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out, out / (out / "latest").read_text().strip()


def test_checkpoint_carries_checksums_of_its_files(saved_run):
    ckpt = ftrain.resolve_checkpoint(saved_run)
    sums = json.loads((ckpt / "checksums.json").read_text())["sha256"]
    assert set(ftrain.RESUME_FILES) <= set(sums)
    import hashlib

    assert sums["config.json"] == hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest()


def test_one_byte_config_edit_is_caught(saved_run, tmp_path):
    """n_head 4 -> 2 changes no tensor's shape: without a checksum it loads a different model."""
    out, ckpt = _copy_run(saved_run, tmp_path)
    text = (ckpt / "config.json").read_text()
    assert '"n_head": 4' in text
    (ckpt / "config.json").write_text(text.replace('"n_head": 4', '"n_head": 2'))
    with pytest.raises(ftrain.CheckpointError, match="config.json.*sha256"):
        ftrain.load_model(out)


def test_one_byte_dtype_edit_in_the_header_is_caught(saved_run, tmp_path):
    """F32 -> I32 in the safetensors header: the checksum catches it; without checksums.json
    (an older checkpoint), the dtype check against the model does."""
    out, ckpt = _copy_run(saved_run, tmp_path)
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    at = raw.index(b'"F32"')
    raw[at + 1] = ord("I")
    (ckpt / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ftrain.CheckpointError, match="model.safetensors.*sha256"):
        ftrain.load_model(out)
    (ckpt / "checksums.json").unlink()
    with pytest.warns(UserWarning, match="checksums.json"), \
            pytest.raises(ftrain.CheckpointError, match="model.safetensors.*int32"):
        ftrain.load_model(out)


def test_checkpoint_without_checksums_loads_with_a_warning(saved_run, tmp_path):
    out, ckpt = _copy_run(saved_run, tmp_path)
    (ckpt / "checksums.json").unlink()
    with pytest.warns(UserWarning, match="cannot be verified"):
        model, _ = ftrain.load_model(out)
    ref, _ = ftrain.load_model(saved_run)
    ids = torch.randint(0, 300, (1, 8))
    torch.testing.assert_close(model(ids)[0], ref(ids)[0], rtol=0, atol=0)


def test_bad_checksum_file_is_named(saved_run, tmp_path):
    out, ckpt = _copy_run(saved_run, tmp_path)
    (ckpt / "checksums.json").write_text('{"sha256": [1, 2]}')
    with pytest.raises(ftrain.CheckpointError, match="checksums.json"):
        ftrain.load_model(out)
    (ckpt / "checksums.json").write_text('{"sha')
    with pytest.raises(ftrain.CheckpointError, match="checksums.json"):
        ftrain.load_model(out)


def test_zero_heads_in_config_is_a_checkpoint_error(saved_run, tmp_path):
    """n_head 0 escaped load_model as ZeroDivisionError."""
    out, ckpt = _copy_run(saved_run, tmp_path)
    (ckpt / "checksums.json").unlink()
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "n_head": 0}))
    with pytest.warns(UserWarning), pytest.raises(ftrain.CheckpointError, match="config.json.*n_head"):
        ftrain.load_model(out)


def test_truncated_rng_state_is_a_checkpoint_error(corpus, saved_run, tmp_path):
    """A cut torch RNG state in trainer.json escaped `train-lm --resume` as a raw RuntimeError."""
    out, ckpt = _copy_run(saved_run, tmp_path)
    (ckpt / "checksums.json").unlink()
    trainer = json.loads((ckpt / "trainer.json").read_text())
    trainer["rng"][0]["torch"] = trainer["rng"][0]["torch"][:40]
    (ckpt / "trainer.json").write_text(json.dumps(trainer))
    with pytest.warns(UserWarning), pytest.raises(ftrain.CheckpointError, match="trainer.json"):
        ftrain.train(_config(corpus, out, steps=4), resume=True)

"""`fastlm bench`'s plots are read by people: every tick label of every panel can be read (no two
overlap) and the legend covers no panel, for an op with many cases in one pass (quant_matmul's
shape sweeps) and one with three passes and a group that has only one of them."""

import itertools

import pytest
import torch

from fastlm import bench
from fastlm.bench import harness

pytest.importorskip("matplotlib")


def _rows(op: str, cases: list[str], passes: list[str], impls: list[str], only_fwd: tuple = ()) -> list[dict]:
    rows = []
    for n, (case, p) in enumerate(itertools.product(cases, passes)):
        if p != "fwd" and case.startswith(only_fwd):
            continue
        for k, impl in enumerate(["torch", *impls]):
            # Speedups from 0.05x to 30x, so that the log axis spans many decades.
            vs = 1.0 if impl == "torch" else 0.05 * (1.7 ** ((n * 7 + k * 3) % 12))
            rows.append({"op": op, "case": case, "shape": [1], "dtype": "float32", "pass_": p, "impl": impl,
                         "ms": 1.0, "rate": 1.0, "metric": "GB/s", "pct_ceiling": 10.0, "vs_eager": vs,
                         "vs_compile": None})
    return rows


def _quant_like() -> list[dict]:
    ms = (1, 2, 4, 8, 16, 32, 64, 128)
    cases = [f"int8 M={m} (4.0x)" for m in ms] + [f"int4/128 asym M={m} (7.1x)" for m in ms]
    cases += [f"gpt2 {layer} int{b} M={m} (4.0x)" for layer in ("qkv 2304x768", "mlp-out 768x3072")
              for b in (8, 4) for m in (1, 16)]
    return _rows("quant_matmul", cases, ["fwd"], ["fastlm-cpu", "fastlm-triton", "torch int8pack",
                                                  "torch int4pack"])


def _attention_like() -> list[dict]:
    cases = ["causal 4x8x1024x64", "full 4x8x1024x64"] + [f"decode 4x8/8x{t}x64" for t in (256, 1024, 4096)]
    return _rows("attention", cases, list(harness.PASSES), ["fastlm-cpu", "naive", "torch.compile"],
                 only_fwd=("decode",))


def _overlaps(labels, renderer) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels if t.get_visible() and t.get_text()]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def _check_readable(fig) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert fig.axes
    for ax in fig.axes:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            assert not _overlaps(labels, renderer), f"{ax.get_title()}: tick labels overlap"
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer)), f"the legend covers {ax.get_title()}"


@pytest.mark.parametrize("make", [_quant_like, _attention_like])
def test_plot_is_readable(make, tmp_path):
    import matplotlib.pyplot as plt

    rows = make()
    fig = bench.figure(rows[0]["op"], rows)
    try:
        _check_readable(fig)
    finally:
        plt.close(fig)
    path = bench.draw(rows[0]["op"], rows, tmp_path / "plot.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_panel_per_group_and_pass():
    import matplotlib.pyplot as plt

    fig = bench.figure("attention", _attention_like())
    plt.close(fig)
    titles = sorted(ax.get_title(loc="left") for ax in fig.axes)
    assert titles == sorted([f"{g}: {p}" for g in ("causal", "full")
                             for p in ("forward", "backward", "forward + backward")] + ["decode: forward"])
    # Labels name what varies inside the group; the panel's title names the group.
    decode = next(ax for ax in fig.axes if ax.get_title(loc="left") == "decode: forward")
    assert [t.get_text() for t in decode.get_yticklabels()] == ["4x8/8x256x64", "4x8/8x1024x64", "4x8/8x4096x64"]


def test_overlap_check_can_fail():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.set_yticks(range(40))
    ax.set_yticklabels([f"case {i}" for i in range(40)])
    fig.canvas.draw()
    assert _overlaps(ax.get_yticklabels(), fig.canvas.get_renderer())
    plt.close(fig)


def test_case_group_defaults_to_the_family():
    assert harness.case_group("layer_norm 8192x768") == "layer_norm"
    assert harness.case_group("int4/128 asym M=1 (7.1x)") == "int4/128"
    case = harness.Case(op="norm", name="rms_norm 8192x768", shape=(8192, 768), dtype=torch.float32,
                        make=lambda: (), impls={}, work={})
    assert case.group == "rms_norm"
    assert harness.Case(op="norm", name="x 1", shape=(1,), dtype=torch.float32, make=lambda: (), impls={},
                        work={}, group="mine").group == "mine"


def test_cli_redraws_plots_from_a_results_file(tmp_path):
    import json

    from fastlm import cli

    results = tmp_path / "box.json"
    results.write_text(json.dumps({"machine": {}, "ops": {"attention": {"rows": _attention_like()}}}))
    assert cli.main(["bench", "--redraw", str(results)]) == 0
    png = tmp_path / "box-attention.png"
    assert png.exists() and png.stat().st_size > 10_000

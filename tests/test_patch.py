"""fastlm.nn modules are drop-ins, and patch/unpatch swap them inside any model."""

import pytest
import torch

import fastlm


def model():
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.LayerNorm(32),
        torch.nn.Sequential(torch.nn.GELU(), torch.nn.RMSNorm(32, eps=1e-6)),
        torch.nn.LayerNorm(32, elementwise_affine=False),
        torch.nn.LayerNorm(32, bias=False),
    )


def test_modules_have_torch_state_dicts():
    for fast, slow in [
        (fastlm.nn.LayerNorm(8), torch.nn.LayerNorm(8)),
        (fastlm.nn.LayerNorm((2, 4), bias=False), torch.nn.LayerNorm((2, 4), bias=False)),
        (fastlm.nn.RMSNorm(8, eps=1e-3), torch.nn.RMSNorm(8, eps=1e-3)),
    ]:
        assert fast.state_dict().keys() == slow.state_dict().keys()
        fast.load_state_dict(slow.state_dict())
        x = torch.randn(3, *fast.normalized_shape)
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)
        assert isinstance(fast, type(slow))


def test_patch_swaps_in_place_and_keeps_outputs_and_state():
    torch.manual_seed(0)
    m = model()
    x = torch.randn(5, 16)
    before = m(x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    params = [id(p) for p in m.parameters()]

    assert fastlm.patch(m) is m
    kinds = [type(mod) for mod in m.modules()]
    assert kinds.count(fastlm.nn.LayerNorm) == 3 and kinds.count(fastlm.nn.RMSNorm) == 1
    assert torch.nn.LayerNorm not in kinds
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    assert [id(p) for p in m.parameters()] == params
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())

    fastlm.unpatch(m)
    kinds = [type(mod) for mod in m.modules()]
    assert fastlm.nn.LayerNorm not in kinds and kinds.count(torch.nn.LayerNorm) == 3
    torch.testing.assert_close(m(x), before)


def test_patch_trains():
    torch.manual_seed(0)
    m = fastlm.patch(model())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, target = torch.randn(8, 16), torch.randn(8, 32)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_patch_leaves_subclasses_alone():
    class MyNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    m = torch.nn.Sequential(MyNorm(4))
    fastlm.patch(m)
    assert type(m[0]) is MyNorm


def test_patch_refuses_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastlm.patch([torch.nn.LayerNorm(3)])


def test_fastlm_imports_and_patches_without_transformers():
    """transformers is an optional extra: with it unimportable, fastlm imports and patches as before."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch, fastlm\n"
            "m = fastlm.patch(torch.nn.Sequential(torch.nn.LayerNorm(4)))\n"
            "assert type(m[0]) is fastlm.nn.LayerNorm\n")
    subprocess.run([sys.executable, "-c", code], check=True)

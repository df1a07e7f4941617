"""The one way from an op to its kernels.

An op declares each kernel call once, as a function of the backend's kernel namespace `lib`
(torch.ops.fastlm_C for "cpu" and "cuda", whose dispatcher picks the kernel by device; the
module fastlm.kernels.<family> for "triton"), and its autograd formula once:

    @kernel_op("norm")
    def norm_fwd(lib, x: Tensor, weight: Tensor | None, ...) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return lib.norm_fwd(x, weight, ...)

    norm_fwd.register_fake(...)
    norm_fwd.register_autograd(setup_context, backward, nondiff_outputs=(2, 3))
    y, h, mean, rstd = norm_fwd(x, weight, ..., backend="cpu")

Calling it takes one of three routes, all to the same kernel, so the result never depends on it:

    direct    outside torch.compile with no gradient to track: the kernel as a plain call
              (inference; decode runs a norm per layer per token).
    eager     outside torch.compile with a gradient to track: a plain torch.autograd.Function
              around the kernels, which skips the custom op's Python layers (dispatch, autograd
              wrapper, context set-up): about 100 us a call, as long as a small model's whole
              layer norm takes.
    compiled  under torch.compile: the torch.library custom op torch.ops.fastlm.<name>, with its
              fake and its autograd formula, which the compiler traces as one node.

A backward formula calls other kernel ops through `op.via(ctx)`, which takes the route its forward
took: the custom op under torch.compile (where the raw kernels have no fake), the kernel otherwise.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


@functools.cache
def _triton_module(family: str):
    return importlib.import_module(f"fastlm.kernels.{family}")


def kernels(family: str, backend: str):
    """The namespace holding `family`'s kernels on `backend`."""
    if backend == "triton":
        return _triton_module(family)
    return torch.ops.fastlm_C


def _cuda_device(args) -> torch.device | None:
    return next((a.device for a in args if isinstance(a, Tensor) and a.is_cuda), None)


def run(family: str, body: Callable, backend: str, args) -> object:
    """body(lib, *args). Triton launches on the current CUDA device, not the tensors' (the C++
    entry points guard themselves): tensors on cuda:1 while cuda:0 is current would fault."""
    lib = kernels(family, backend)
    if backend == "triton" and (device := _cuda_device(args)) is not None:
        with torch.cuda.device(device):
            return body(lib, *args)
    return body(lib, *args)


def _tracks_grad(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


class KernelOp:
    """One kernel call of an op, registered as torch.ops.fastlm.<name>; see the module docstring."""

    def __init__(self, family: str, body: Callable, name: str | None = None):
        self.family, self.body, self.name = family, body, name or body.__name__
        sig = inspect.signature(body, eval_str=True)
        params = [*list(sig.parameters.values())[1:],
                  inspect.Parameter("backend", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)]

        def impl(*args):
            return run(family, body, args[-1], args[:-1])

        impl.__signature__ = sig.replace(parameters=params)
        self._arg_names = [p.name for p in params[:-1]]
        impl.__name__, impl.__doc__, impl.__module__ = self.name, body.__doc__, body.__module__
        self.op = torch.library.custom_op(f"fastlm::{self.name}", impl, mutates_args=())
        self._eager: type[torch.autograd.Function] | None = None

    def register_fake(self, fake: Callable) -> Callable:
        """fake(*args): outputs of the right shapes and dtypes, for the same args minus backend.
        Tensors on more than one device are refused first, with a RuntimeError as a kernel refuses a
        broken contract: a meta tensor beside real ones sends the call here, and a fake would
        answer with an uninitialised tensor instead of an error."""
        names = self._arg_names

        def checked(*args):
            on = [(n, a.device) for n, a in zip(names, args[:-1]) if isinstance(a, Tensor)]
            for n, d in on[1:]:
                if d != on[0][1]:
                    raise RuntimeError(f"fastlm.{self.name}: {n} is on {d} but {on[0][0]} is on {on[0][1]}")
            return fake(*args[:-1])

        self.op.register_fake(checked)
        return fake

    def register_autograd(self, setup_context: Callable, backward: Callable, *,
                          nondiff_outputs: Sequence[int] = ()) -> None:
        """setup_context(ctx, inputs, output) and backward(ctx, *grads) -> one grad per input, as
        torch.library's, over the inputs without backend; ctx.backend is set for both."""

        def setup(ctx, inputs, output, eager=False):
            ctx.backend, ctx.eager = inputs[-1], eager
            setup_context(ctx, inputs[:-1], output)

        def backward_all(ctx, *grads):
            return (*backward(ctx, *grads), None)

        self.op.register_autograd(backward_all, setup_context=setup)
        op = self

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = run(op.family, op.body, args[-1], args[:-1])
                setup(ctx, args, out, eager=True)
                if nondiff_outputs:
                    ctx.mark_non_differentiable(*(out[i] for i in nondiff_outputs))
                return out

            @staticmethod
            def backward(ctx, *grads):
                return backward_all(ctx, *grads)

        Eager.__name__ = Eager.__qualname__ = f"Eager_{self.name}"
        self._eager = Eager

    def __call__(self, *args, backend: str):
        if torch.compiler.is_compiling():
            return self.op(*args, backend)
        if self._eager is not None and _tracks_grad(args):
            return self._eager.apply(*args, backend)
        return run(self.family, self.body, backend, args)

    def via(self, ctx) -> Callable:
        """This op, called from the backward of an op whose context is ctx, by the same route."""
        if ctx.eager:
            return lambda *args: run(self.family, self.body, ctx.backend, args)
        return lambda *args: self.op(*args, ctx.backend)


def kernel_op(family: str, name: str | None = None) -> Callable[[Callable], KernelOp]:
    """Declare a kernel call of `family`'s kernels, registered as torch.ops.fastlm.<name> (by default
    the function's name); see the module docstring."""
    return lambda body: KernelOp(family, body, name)

"""fastlm kernels inside Hugging Face transformers models: GPT-2, Llama / Mistral / Qwen2 / Qwen3, BERT / RoBERTa.

    model = AutoModelForCausalLM.from_pretrained(...)
    fastlm.patch(model)            # delegates here for a transformers PreTrainedModel
    fastlm.hf.patch_report(model)  # {"attention": 12, "rms_norm": 25, ...}: what was swapped, per kind
    fastlm.unpatch(model)          # everything back as it was

transformers is imported only when a model of its own is patched, so fastlm imports without it.
Everything is done in place on the model that exists: a layer keeps its class, its Parameters, its
state_dict keys and its hooks, and only its `forward` is shadowed by an instance attribute (a
functools.partial of a function here, so deepcopy and pickling follow the module). An optimizer
built before or after patch holds the same Parameter objects.

What is swapped, and through which transformers extension point:

- attention: a function registered in transformers.AttentionInterface under the name "fastlm",
  with transformers' own sdpa mask builder registered for that name in AttentionMaskInterface (a
  name without a mask function makes transformers skip mask creation, silently dropping causal,
  padding and sliding-window masks), selected by model.set_attn_implementation("fastlm"). Masks
  arrive as transformers builds them for sdpa: None where `is_causal` suffices, else a boolean
  (B, 1, Tq, Tk) mask that already holds padding and any sliding window (Mistral, Qwen2 with
  use_sliding_window), so a window is never silently full attention. GQA runs without repeating
  K/V. A decode step (Tq = 1, no mask) runs ops.decode_attention against the cache's keys; the
  rest runs ops.scaled_dot_product_attention. Attention dropout in training (dropout > 0) has no
  fused kernel and runs on torch's sdpa, as ops.scaled_dot_product_attention documents.
- norms: layers tagged kernel_layer_name == "RMSNorm" (the tag transformers' hub-kernel decorator
  sets when the `kernels` package is installed), else Llama-style *RMSNorm classes (a `weight` and
  a `variance_epsilon`): ops.rms_norm. Llama casts the normalised float32 rows to the input dtype
  and then multiplies by the weight; with a weight of the input's dtype that is one fused kernel
  (one rounding instead of two), with another weight dtype the kernel normalises without a weight
  and the product is taken as Llama takes it, so the result dtype is Llama's. torch.nn.LayerNorm
  (GPT-2, BERT) becomes fastlm.nn.LayerNorm. BERT's output blocks, dropout(dense(x)) then
  LayerNorm(. + residual), run the add and the norm as one ops.add_layer_norm. The Llama-family
  residual adds live inside the decoder layer's forward, which has no extension point, so they
  stay unfused.
- MLPs: a SwiGLU MLP (gate_proj, up_proj, down_proj and a SiLU act_fn) runs ops.silu_mul; GPT-2's
  MLP (Conv1D, then GELU) runs the matmul without its bias and ops.bias_gelu; BERT's intermediate
  (Linear, then GELU) runs ops.linear_gelu.
- rotary: transformers calls a module-level apply_rotary_pos_emb inside each attention forward. Its
  hub-kernel hook (use_kernelized_func) exists only with the `kernels` package and loads kernels
  from the Hub, so there is no local extension point: the function is replaced in the modeling
  module (transformers.models.llama.modeling_llama etc.) by one that runs ops.rotary_embedding
  only inside a patched attention layer and calls the original everywhere else, so unpatched
  models of the same family are unchanged. The original is put back when the last patched model
  of that family is unpatched.
- the causal-LM loss: when labels are given, the LM head's matmul and the cross-entropy run as one
  ops.linear_cross_entropy over the base model's last hidden state (labels shifted as
  transformers shifts them, mean over tokens that are not -100, or the sum over
  num_items_in_batch when it is given), so the (tokens x vocab) logits are never built. The output
  then has `logits=None` while grad mode is on (training); under torch.no_grad the full logits are
  computed as well, for evaluation loops that read them.
- nn.Embedding becomes fastlm.nn.Embedding.
- the decoder stack of a Llama / Mistral / Qwen2 / Qwen3 (its base model's forward, shadowed like the layers'):
  once quantize_(..., act_quant=True) has made every projection an integer-dot QuantLinear, a CPU
  decode step runs all decoder layers in one kernel call (fastlm.hf_decode, which says what it
  covers); every other call is transformers' forward.

A model whose family is not covered is left entirely alone (nothing swapped) and reported with a
warning; so is a covered family's model whose config asks for something these paths do not do
(an attention logit soft-cap).
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import threading
import warnings
import weakref
from collections import Counter

import torch

from fastlm import hf_decode, ops

ATTENTION = "fastlm"
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "bert", "roberta")
_STATE = "_fastlm_hf"
_GELU = {"NewGELUActivation": "tanh", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh", "GELUActivation": "none"}
_SILU = ("SiLUActivation", "SiLU")


def is_transformers_model(model: object) -> bool:
    """True for a transformers PreTrainedModel; never imports transformers itself (a model of its own
    means it is imported already)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def untie(model: torch.nn.Module, names: list[str]) -> None:
    """The layers `names` of transformers model `model`, tied to its input embedding until
    fastlm.quantize_(quantize_tied=True) made them QuantLinears, are no longer tied: the config
    says so, so that transformers' tie_weights (an explicit call, from_pretrained, a resize) leaves
    them alone instead of setting a float weight on them, and a saved config matches the weights."""
    for prefix, sub in model.named_modules():
        if not is_transformers_model(sub):
            continue
        ours = [n[len(prefix) + 1:] if prefix else n for n in names if not prefix or n.startswith(prefix + ".")]
        if not ours:
            continue
        keys = getattr(sub, "all_tied_weights_keys", None)
        if isinstance(keys, dict):
            for n in ours:
                keys.pop(f"{n}.weight", None)
        for cfg in {id(c): c for c in (sub.config, sub.config.get_text_config())}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False


def patch_report(model: torch.nn.Module) -> dict:
    """What patch swapped in `model`, per kind, or {} when it is not patched."""
    state = getattr(model, _STATE, None)
    return dict(state["report"]) if state else {}


# --- attention ---------------------------------------------------------------------------------


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: query (B, Hq, Tq, D), key and value (B, Hk, Tk, D)
    after the cache update; returns (output (B, Tq, Hq, D) contiguous, None) (no attention weights)."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("fastlm attention: attention soft-capping and sink logits are not supported")
    tq, tk = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    # The mask builder returns None exactly where torch's is_causal (upper-left aligned) is right.
    causal = bool(tq > 1 and attention_mask is None and causal)
    if causal and tk > tq:
        # Prefill into an empty static cache: the keys past the queries are empty slots.
        key, value = key[:, :, :tq], value[:, :, :tq]
    gqa = query.shape[1] != key.shape[1]
    if tq == 1 and attention_mask is None and not (torch.is_grad_enabled() and query.requires_grad):
        seqlens = torch.full((query.shape[0],), tk, dtype=torch.int32, device=query.device)
        out = ops.decode_attention(query, key, value, seqlens, scale=scaling, seqlen_range=(tk, tk))
    else:
        out = ops.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                               is_causal=causal, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register fastlm's attention and its mask builder with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


# --- per-layer forwards --------------------------------------------------------------------------


def _rms_forward(self, x):
    shape = (self.weight.shape[-1],)
    eps = self.variance_epsilon
    if self.weight.dtype == x.dtype:
        return ops.rms_norm(x, shape, self.weight, eps)
    return self.weight * ops.rms_norm(x, shape, None, eps)


def _swiglu_forward(self, x):
    return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _conv1d_gelu_forward(self, x, approximate: str):
    fc = self.c_fc
    h = torch.matmul(x, fc.weight)
    h = ops.bias_gelu(h, fc.bias, approximate)
    return self.dropout(self.c_proj(h))


def _linear_gelu_forward(self, x, approximate: str):
    return ops.linear_gelu(x, self.dense.weight, self.dense.bias, approximate)


def _add_norm_forward(self, hidden_states, input_tensor):
    ln = self.LayerNorm
    h = self.dropout(self.dense(hidden_states))
    return ops.add_layer_norm(h, input_tensor, ln.normalized_shape, ln.weight, ln.bias, ln.eps)[0]


# Set while a patched attention layer runs: the modeling module's apply_rotary_pos_emb is
# replaced for the whole family, and must stay transformers' own for unpatched models.
_ACTIVE = threading.local()


def _attention_forward(self, *args, **kwargs):
    _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _ACTIVE.depth -= 1


def _rotary(original, q, k, cos, sin, unsqueeze_dim=1, **kwargs):
    if not getattr(_ACTIVE, "depth", 0) or unsqueeze_dim != 1 or kwargs:
        return original(q, k, cos, sin, unsqueeze_dim, **kwargs)
    return ops.rotary_embedding(q, k, cos, sin)


# module name -> (the original apply_rotary_pos_emb, the live patched models using the replacement).
# Weak references: a patched model that is dropped without unpatch releases its claim.
_ROTARY: dict[str, tuple] = {}


def _hook_rotary(module_name: str, model) -> bool:
    mod = sys.modules[module_name]
    if module_name not in _ROTARY:
        original = getattr(mod, "apply_rotary_pos_emb", None)
        if original is None:
            return False
        _ROTARY[module_name] = (original, weakref.WeakSet())
        mod.apply_rotary_pos_emb = functools.partial(_rotary, original)
    _ROTARY[module_name][1].add(model)
    return True


def _unhook_rotary(model) -> None:
    """Drop model's claims; put back every original that no live patched model uses."""
    for module_name, (original, users) in list(_ROTARY.items()):
        users.discard(model)
        if not users:
            sys.modules[module_name].apply_rotary_pos_emb = original
            del _ROTARY[module_name]


# --- recognising layers ----------------------------------------------------------------------------


def _is_linear(m) -> bool:
    return type(m) is torch.nn.Linear


def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "weight") and hasattr(m, "bias")


def _layer_forward(m):
    """(kind, forward) for a layer fastlm runs, or None."""
    cls = type(m)
    name = cls.__name__
    tag = getattr(cls, "kernel_layer_name", None)
    if (tag == "RMSNorm" or name.endswith("RMSNorm")) and hasattr(m, "variance_epsilon") \
            and isinstance(getattr(m, "weight", None), torch.nn.Parameter):
        return "rms_norm", _rms_forward
    act = getattr(m, "act_fn", None)
    if all(_is_linear(getattr(m, p, None)) for p in ("gate_proj", "up_proj", "down_proj")) \
            and type(act).__name__ in _SILU:
        return "swiglu_mlp", _swiglu_forward
    act = getattr(m, "act", None)
    if _is_conv1d(getattr(m, "c_fc", None)) and _is_conv1d(getattr(m, "c_proj", None)) \
            and type(act).__name__ in _GELU and hasattr(m, "dropout"):
        return "gelu_mlp", functools.partial(_conv1d_gelu_forward, approximate=_GELU[type(act).__name__])
    act = getattr(m, "intermediate_act_fn", None)
    if name.endswith("Intermediate") and _is_linear(getattr(m, "dense", None)) \
            and type(act).__name__ in _GELU:
        return "gelu_mlp", functools.partial(_linear_gelu_forward, approximate=_GELU[type(act).__name__])
    ln = getattr(m, "LayerNorm", None)
    if name.endswith("Output") and _is_linear(getattr(m, "dense", None)) \
            and isinstance(ln, torch.nn.LayerNorm) and isinstance(getattr(m, "dropout", None), torch.nn.Dropout):
        return "add_layer_norm", _add_norm_forward
    return None


def _is_attention(m) -> bool:
    name = type(m).__name__
    return (name.endswith("Attention") and "Cross" not in name and hasattr(m, "scaling")
            and type(m).__module__.startswith("transformers.models."))


def _unsupported(model) -> str | None:
    cfg = model.config
    family = getattr(cfg, "model_type", None)
    if family not in FAMILIES:
        return f"model family {family!r} is not covered (covered: {', '.join(FAMILIES)})"
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping is not covered"
    if not model._can_set_attn_implementation():
        return f"{type(model).__name__} does not select its attention through transformers.AttentionInterface"
    return None


def _decoder_stack(model):
    """The Llama / Mistral / Qwen2 / Qwen3 base model (LlamaModel, ...) of model, whose decode steps
    hf_decode may run as one call, or None."""
    if model.config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        return None
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    ok = isinstance(base, torch.nn.Module) and "forward" not in base.__dict__ \
        and all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
    return base if ok else None


# --- the causal-LM loss -------------------------------------------------------------------------


def _has_fusable_head(model) -> bool:
    head = getattr(model, "lm_head", None)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return (type(model).__name__.endswith("LMHeadModel") or type(model).__name__.endswith("ForCausalLM")) \
        and _is_linear(head) and head.bias is None and isinstance(base, torch.nn.Module) \
        and getattr(model.config, "final_logit_softcapping", None) is None


def _lm_forward(self, *args, labels=None, **kwargs):
    cls_forward = type(self).forward
    if labels is None or "shift_labels" in kwargs:
        return cls_forward(self, *args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = list(inspect.signature(cls_forward).parameters)[1:]
    kwargs.update(zip(names, args))
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    n_items = kwargs.pop("num_items_in_batch", None)
    base = getattr(self, self.base_model_prefix)
    out = base(**kwargs)
    hidden = out.last_hidden_state
    target = labels[:, 1:].to(hidden.device)
    loss = ops.linear_cross_entropy(hidden[:, :-1], self.lm_head.weight, target, ignore_index=-100)
    if n_items is not None:
        loss = loss * (target != -100).sum() / n_items
    logits = None if torch.is_grad_enabled() else self.lm_head(hidden)
    return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=getattr(out, "past_key_values", None),
                                  hidden_states=out.hidden_states, attentions=out.attentions)


# --- patch / unpatch -----------------------------------------------------------------------------


def _swap_forwards(model, report: Counter) -> tuple[list, Counter]:
    """Shadow the forward of every layer fastlm runs; returns (the layers, attention layers per
    modeling module that defines apply_rotary_pos_emb)."""
    layers, modules = [], Counter()
    for m in model.modules():
        if "forward" in m.__dict__:
            continue
        if _is_attention(m):
            m.forward = functools.partial(_attention_forward, m)
            layers.append(m)
            report["attention"] += 1
            if "apply_rotary_pos_emb" in vars(sys.modules[type(m).__module__]):
                modules[type(m).__module__] += 1
            continue
        found = _layer_forward(m)
        if found is not None:
            kind, fn = found
            m.forward = functools.partial(fn, m)
            layers.append(m)
            report[kind] += 1
    return layers, modules


def patch(model: torch.nn.Module, swaps: dict[type, type]) -> torch.nn.Module:
    """Patch a transformers model in place (see the module docstring); `swaps` is the table of torch
    module classes and their fastlm twins. Returns the model; patch_report(model) says what changed."""
    if getattr(model, _STATE, None):
        return model
    reason = _unsupported(model)
    if reason is not None:
        warnings.warn(f"fastlm.patch: {type(model).__name__} left unpatched: {reason}", stacklevel=3)
        model.__dict__[_STATE] = {"report": {"unsupported": reason}, "layers": [], "classes": [], "modules": []}
        return model
    register()
    report: Counter = Counter()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    layers, modules = _swap_forwards(model, report)
    hooked = [name for name in sorted(modules) if _hook_rotary(name, model)]
    report["rotary"] = sum(modules[name] for name in hooked)
    classes = []
    for m in model.modules():
        fast = swaps.get(type(m))
        if fast is not None:
            classes.append((m, type(m)))
            m.__class__ = fast
            report[re.sub(r"(?<!^)(?=[A-Z])", "_", fast.__name__).lower()] += 1
    base = _decoder_stack(model)
    if base is not None:
        base.forward = functools.partial(hf_decode.base_forward, base)
        layers.append(base)
        report["decode_stack"] = 1
    if _has_fusable_head(model):
        forward = functools.partial(_lm_forward, model)
        # generate() and Trainer read the forward's signature (attention_mask, position_ids,
        # logits_to_keep, the dataset columns to keep): it must stay the model's own.
        forward.__signature__ = inspect.signature(model.forward)
        model.forward = forward
        report["loss"] = 1
    model.__dict__[_STATE] = {"report": {k: v for k, v in report.items() if v}, "previous": previous, "layers": layers,
                              "modules": hooked, "classes": classes}
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch: the original forwards, classes, attention implementation and rotary function."""
    state = model.__dict__.pop(_STATE, None)
    if not state:
        return model
    model.__dict__.pop("forward", None)
    for m in state["layers"]:
        m.__dict__.pop("forward", None)
    for m, cls in state["classes"]:
        m.__class__ = cls
    _unhook_rotary(model)
    if "previous" in state:
        model.set_attn_implementation(state["previous"])
    return model


__all__ = ["ATTENTION", "FAMILIES", "attention", "is_transformers_model", "patch", "patch_report", "register",
           "unpatch"]

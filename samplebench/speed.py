"""Speed switches: torch.compile, channels_last, TF32 and the attention (SDPA) backend.

All are off by default, since each can change the numbers (compile's fused kernels and channels_last's
convolution algorithms reorder float sums; TF32 rounds matmul inputs to 10 mantissa bits; attention
backends sum in different orders). A switch at its default value leaves a cell's identity (config_hash,
model_hash) exactly what it was before the switches existed; a non-default one enters it (identity_model,
identity_extra), but not the readable folder label (config._UNLABELLED): like model.path, it changes
how the numbers are made, not what is being compared.

The network-model keys live in each conf/model/<network>.yaml (model.compile, model.compile_mode,
model.compile_backend, model.channels_last, model.attention); the analytic models (gmm, gmm_flow) have
no network and no such keys, so `model.compile=true` there is the usual one-line "unknown key" error.
allow_tf32 is top level (conf/config.yaml): torch's TF32 flags are process-wide.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from samplebench.errors import UsageError

# The model-level switches and their defaults (as in conf/model/<network>.yaml).
MODEL_DEFAULTS: dict[str, Any] = {
    "compile": False,
    "compile_mode": "default",
    "compile_backend": "inductor",
    "channels_last": False,
    "attention": "default",
}
COMPILE_ONLY = ("compile_mode", "compile_backend")  # no effect (and no identity) unless compile is on
# torch.compile's modes (torch/__init__.py, compile(): mode=...)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Modes that capture CUDA graphs (cudagraph trees): a graph is recorded on its second run, not its first.
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
ATTENTION = ("default", "math", "flash", "efficient", "cudnn")


def _sdp_backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]


def _switches(model: dict[str, Any]) -> dict[str, Any]:
    return {k: model.get(k, v) for k, v in MODEL_DEFAULTS.items()}


def identity_model(model: dict[str, Any]) -> dict[str, Any]:
    """The model config as it enters the identity: switches at their defaults left out (so identities
    made before the switches existed still match), compile's options left out while compile is off."""
    off = not model.get("compile", False)
    return {
        k: v
        for k, v in model.items()
        if not (k in MODEL_DEFAULTS and (v == MODEL_DEFAULTS[k] or (off and k in COMPILE_ONLY)))
    }


def identity_extra(config: dict[str, Any]) -> dict[str, Any]:
    """Top-level switches that enter the identity: allow_tf32 only when on."""
    return {"allow_tf32": True} if config.get("allow_tf32") else {}


def check(c: dict[str, Any]) -> None:
    """One-line errors for bad switch values (config.validate)."""
    if not isinstance(c.get("allow_tf32", False), bool):
        raise UsageError(f"allow_tf32={c.get('allow_tf32')} must be true or false")
    model = c.get("model") or {}
    for key in ("compile", "channels_last"):
        if not isinstance(model.get(key, False), bool):
            raise UsageError(f"model.{key}={model.get(key)} must be true or false")
    mode = model.get("compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise UsageError(f"model.compile_mode={mode} is unknown; choose one of {', '.join(COMPILE_MODES)}")
    attention = model.get("attention", "default")
    if attention not in ATTENTION:
        raise UsageError(f"model.attention={attention} is unknown; choose one of {', '.join(ATTENTION)}")
    backend = model.get("compile_backend", "inductor")
    if model.get("compile") and backend != "inductor":
        valid = torch._dynamo.list_backends(exclude_tags=())
        if backend not in valid:
            raise UsageError(
                f"model.compile_backend={backend} is unknown; choose one of {', '.join(sorted(valid))}"
            )
    timing = c.get("timing") or {}
    if model.get("compile") and timing.get("warmup", True) is False:
        raise UsageError(
            "model.compile=true needs timing.warmup=true: without warm-up calls the compile time would be "
            "timed as sampling"
        )


def tf32_flags() -> dict[str, Any]:
    """torch's TF32 flags as they are now (what actually applies, not what was asked)."""
    return {
        "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


@dataclass
class TF32:
    """The flags before set_tf32, brought back by restore()."""

    matmul: bool
    cudnn: bool

    def restore(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.matmul
        torch.backends.cudnn.allow_tf32 = self.cudnn


def set_tf32(on: bool) -> TF32:
    """Set both TF32 flags (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) for
    a model's cells; CPU kernels ignore them."""
    before = TF32(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(on)
    torch.backends.cudnn.allow_tf32 = bool(on)
    return before


def describe(model: dict[str, Any], allow_tf32: bool) -> dict[str, Any]:
    """The switches in effect for a model, for provenance and load.json (torch's actual TF32 flags read
    back after setting them)."""
    sw = _switches(model)
    before = set_tf32(allow_tf32)
    try:
        flags = tf32_flags()
    finally:
        before.restore()
    out = {"allow_tf32": bool(allow_tf32), "torch_tf32": flags, **sw}
    if not sw["compile"]:
        out["compile_mode"] = out["compile_backend"] = None
    return out


# -- compile accounting ---------------------------------------------------------------------------
def compile_state() -> tuple[int, float]:
    """(graphs compiled by dynamo so far, seconds spent compiling so far) in this process: differences
    around a call say whether (and how long) it compiled. Dynamo's own counters
    (torch._dynamo.utils.counters["stats"]["unique_graphs"], compilation_time_metrics of
    _compile.compile_inner, which spans tracing, inductor codegen and max-autotune benchmarking)."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet (and no import of dynamo for it)
        return 0, 0.0
    from torch._dynamo import utils

    graphs = int(utils.counters["stats"]["unique_graphs"])
    seconds = float(sum(utils.compilation_time_metrics.get("_compile.compile_inner", [])))
    return graphs, seconds


# -- applying the switches to a network -------------------------------------------------------------
def _channels_last(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _check_attention(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """A tiny SDPA call under the backend, so an unavailable one fails at load, not deep in the loop."""
    from torch.nn.attention import sdpa_kernel

    q = torch.zeros(1, 1, 8, 64, device=device, dtype=dtype)
    try:
        with sdpa_kernel(_sdp_backend(name)):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"model.attention={name} is not available on {device.type} with "
            f"{str(dtype).replace('torch.', '')} ({reason}); choose one of {', '.join(ATTENTION)}"
        ) from e


def apply(net: torch.nn.Module, model: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
    """Switch a loaded network (UNet / transformer) as its config asks, in place: channels_last weights,
    and a forward that makes 4-d inputs channels_last, runs under the chosen SDPA backend
    (torch.nn.attention.sdpa_kernel; diffusers' attention processors call
    F.scaled_dot_product_attention) and is compiled. Nothing is touched when every switch is off."""
    sw = _switches(model)
    if sw["channels_last"]:
        net.to(memory_format=torch.channels_last)
    if sw["attention"] != "default":
        _check_attention(sw["attention"], device, dtype)
    if not sw["compile"] and not sw["channels_last"] and sw["attention"] == "default":
        return
    forward = net.forward
    if sw["compile"]:
        # Static shapes (dynamic=False): one graph per input shape, compiled during the generator's untimed
        # warm-ups (generate.make_shard warms every batch shape); the default (automatic dynamic) would
        # recompile on the second shape, inside a timed call. Enough recompiles for a sweep's shapes.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode, backend = sw["compile_mode"], sw["compile_backend"]
        # mode is inductor's (torch.compile refuses other backends' non-default modes)
        mode = mode if backend == "inductor" else None
        forward = torch.compile(forward, mode=mode, backend=backend, dynamic=False)
    net.forward = _switched(forward, sw, sw["attention"])


def _switched(forward: Callable[..., Any], sw: dict[str, Any], attention: str) -> Callable[..., Any]:
    from torch.nn.attention import sdpa_kernel

    cudagraphs = sw["compile"] and sw["compile_mode"] in CUDAGRAPH_MODES

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        if sw["channels_last"]:
            args = tuple(_channels_last(a) for a in args)
            kwargs = {k: _channels_last(v) for k, v in kwargs.items()}
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: no cross-call aliasing
        if attention == "default":
            out = forward(*args, **kwargs)
        else:
            with sdpa_kernel(_sdp_backend(attention)):
                out = forward(*args, **kwargs)
        if cudagraphs:  # a CUDA graph's outputs are overwritten by its next replay: samplers keep them
            out = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        return out

    return call


def compiled(model: dict[str, Any]) -> bool:
    return bool(model.get("compile", False))


def warmup_rounds(model: dict[str, Any]) -> int:
    """Untimed sampler runs per new batch shape: CUDA-graph modes record a graph on its second run, so a
    shape is run twice before any timed call (a sampler run of one step would otherwise record in it)."""
    return 2 if compiled(model) and model.get("compile_mode") in CUDAGRAPH_MODES else 1

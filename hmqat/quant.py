"""LSQ fake quantization, quantized layers, bit configs and HAWQ-V3 size/BOPs accounting.

Implements docs/design.md §3 "Quantizer (LSQ, Esser et al. 2020)" and "Size, compression, BOPs":

    q(x) = s · clamp(round(x/s), Q_N, Q_P)                                         (Eq. Q)
    weights: signed symmetric,  Q_N = -2^(b-1), Q_P = 2^(b-1)-1, per output channel by default
    activations (inputs of quantized layers): unsigned [0, 2^b-1] when calibration sees no more
    than 1 % negative inputs (after ReLU/ReLU6), else signed like the weights; per tensor
    ∂q/∂x = 1 if Q_N < x/s < Q_P else 0                       (straight-through estimator, STE)
    ∂q/∂s = round(x/s) - x/s if Q_N < x/s < Q_P, Q_N if x/s <= Q_N, Q_P if x/s >= Q_P
                                                               (LSQ step gradient), scaled by
    g = 1/sqrt(N·Q_P)                                          (LSQ gradient scale)
    size_bytes = Σ_i n_i·b_i/8 + 4·(other parameters incl. steps);  MB = 2^20 bytes   (Eq. S)
    BOPs = Σ_i MACs_i · b_i · a_i                                                   (Eq. B)

N in g is the number of elements sharing one step: the weights of one output channel
(per-channel) or of the whole layer (per-tensor); for activations the features of one sample.

Typical use (what hmqat.train.qat does)::

    >>> import torch
    >>> from hmqat.models import create_model
    >>> from hmqat import quant
    >>> fp = create_model("resnet20")
    >>> cfg = quant.uniform_config(fp, 4)                    # first conv / last linear at 8
    >>> qm = quant.quantize_model(fp, cfg, a_bits=4)         # deep copy; fp is untouched
    >>> quant.calibrate_activations(qm, [torch.randn(64, 3, 32, 32)])  # or lazily, see below
    >>> opt = torch.optim.SGD([{"params": quant.weight_parameters(qm)},
    ...                        {"params": quant.quantizer_parameters(qm), "lr": 1e-3}], lr=1e-2)
    >>> quant.model_size_mb(qm), quant.bops(qm)

Choices (docs/method.md §2 gives the reasons):

* The first layer's input (the normalised image, signed) gets a SIGNED per-tensor LSQ quantizer:
  8 bit under policy ``first_last_8`` (so BOPs count it at 8 bit), ``a_bits`` under ``none``.
  All other quantized layers get a per-tensor quantizer at ``a_bits`` whose sign is decided from
  the data it is initialised on (``act_sign="auto"``, docs/method.md §2): unsigned if at most
  1 % of its inputs are negative (every input after a ReLU), signed otherwise (inputs after a
  residual add without ReLU, GELU/SiLU/Hardswish, LayerNorm). ``act_sign="unsigned"`` forces the
  post-ReLU assumption and warns when it would clamp more than 1 % of a layer's inputs to 0.
* Activation steps are initialised lazily from the first batch seen in *training* mode, or by
  :func:`calibrate_activations`. In eval mode an uninitialised activation quantizer passes its
  input through unquantized and warns once (a zero probe input, as ``quantizable_layers`` uses,
  must not fix a step). Weight steps are initialised from the weights when the layer is built.
* ``init="mse"`` searches s = α·max|x|/Q_P over α ∈ {0.01, 0.02, …, 1.00} (per channel for
  weights), minimising ||Q(x) − x||²; activation searches use at most 2^18 evenly strided
  elements of the batch.
* Backends: ``"eager"`` (default; plain torch ops, 4 elementwise passes forward and 5 backward,
  no saved mask, no compiler needed) or ``"compile"`` (``torch.compile``-fused forward and
  backward kernels, one pass each, for tensors of >= 2^16 elements; needs a C++ compiler on CPU,
  ~30 s cold compile, falls back to eager with a warning if compilation fails). Select with
  :func:`set_backend` or the environment variable ``HMQAT_QUANT_BACKEND``. Both give
  bit-identical forward outputs; ``benchmarks/qat_step.py`` measures both.
* Bit widths live in each quantizer's ``bit_width`` buffer, so ``load_state_dict`` restores
  the bits that belong to the loaded steps (e.g. after a precision transition).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models import LayerInfo, quantizable_layers
from .runtime import atomic_write_bytes

__all__ = [
    "act_bits_config",
    "act_bits_of",
    "act_qrange",
    "as_input",
    "bit_config_of",
    "BitConfigError",
    "bops",
    "build_quantized",
    "calibrate_activations",
    "clamped_negative_fraction",
    "compression_ratio",
    "DEFAULT_INPUT_SIZE",
    "fixed_layers",
    "fp32_size_mb",
    "get_backend",
    "init_step",
    "is_quantized",
    "LayerSpec",
    "load_config",
    "LSQQuantizer",
    "MIN_STEP",
    "model_size_mb",
    "POLICIES",
    "QConv2d",
    "QLinear",
    "quantize_model",
    "quantize_weight",
    "quantized_layers",
    "quantizer_parameters",
    "quantizer_steps",
    "replace_module",
    "save_config",
    "set_backend",
    "set_bit_config",
    "step_view",
    "SUPPORTED_BITS",
    "uniform_config",
    "validate_bit_config",
    "weight_parameters",
    "weight_qrange",
]

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
POLICIES: tuple[str, ...] = ("first_last_8", "none")
INIT_METHODS: tuple[str, ...] = ("lsq", "mse")
REINIT_METHODS: tuple[str, ...] = ("range", "mse", "lsq")
ACT_SIGNS: tuple[str, ...] = ("auto", "unsigned", "signed")
NEG_TOLERANCE = 0.01      # an unsigned activation quantizer may clamp at most this share to 0
BACKENDS: tuple[str, ...] = ("eager", "compile")
MB = 2 ** 20
_MSE_GRID = 100          # candidates α = 1/100 … 100/100 of max|x|/Q_P
_MSE_MAX_ELEMS = 2 ** 18  # activation MSE search subsamples to at most this many elements
MIN_STEP = 1e-8          # the step is clamped to this in the forward (guards s <= 0)


class BitConfigError(ValueError):
    """A bit config, bit width, policy or quantizer option is invalid; the message says which."""


# --------------------------------------------------------------------------------------------
# Ranges and step initialisation
# --------------------------------------------------------------------------------------------
def _check_bits(bits: Any, what: str = "bits") -> int:
    """Return ``bits`` as int if it is an integer in SUPPORTED_BITS, else raise BitConfigError."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) \
            or int(bits) not in SUPPORTED_BITS:
        raise BitConfigError(f"{what}: unsupported bits {bits!r}; use an int in {SUPPORTED_BITS}")
    return int(bits)


def _check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise BitConfigError(f"unknown {what} {value!r}; use one of {choices}")
    return value


def weight_qrange(bits: int) -> tuple[int, int]:
    """Signed symmetric integer range (Q_N, Q_P) = (-2^(b-1), 2^(b-1)-1) (docs/design.md §3, Eq. Q)."""
    b = _check_bits(bits)
    return -(2 ** (b - 1)), 2 ** (b - 1) - 1


def act_qrange(bits: int) -> tuple[int, int]:
    """Unsigned integer range (0, 2^b - 1) for post-ReLU activations (docs/design.md §3, Eq. Q)."""
    b = _check_bits(bits)
    return 0, 2 ** b - 1


def _qrange(bits: int, signed: bool) -> tuple[int, int]:
    return weight_qrange(bits) if signed else act_qrange(bits)


def _channel_view(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """x as [C, M] (per output channel = dim 0) or [1, numel] (per tensor)."""
    return x.reshape(x.shape[0], -1) if per_channel and x.dim() > 1 else x.reshape(1, -1)


def _fake_quant_ref(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Eq. Q without gradients: s·clamp(round(x/s), Q_N, Q_P) (s broadcastable to x)."""
    return torch.clamp(x / s, qn, qp).round_().mul_(s)


def _mse_step(x2d: torch.Tensor, qn: int, qp: int, signed: bool) -> torch.Tensor:
    """Grid search s = α·max|x|/Q_P, α ∈ {1..100}/100, minimising ||Q(x)-x||² per row of x2d."""
    amax = x2d.abs().amax(dim=1) if signed else x2d.clamp_min(0).amax(dim=1)
    amax = amax.clamp_min(MIN_STEP)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / qp
    for k in range(1, _MSE_GRID + 1):
        s = amax * (k / _MSE_GRID) / qp
        err = (_fake_quant_ref(x2d, s[:, None], qn, qp) - x2d).pow_(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def init_step(x: torch.Tensor, bits: int, *, signed: bool = True, per_channel: bool = True,
              method: str = "lsq") -> torch.Tensor:
    """Initial LSQ step for tensor ``x`` (docs/design.md §3 "Init").

    ``lsq``: s = 2·mean|x|/sqrt(Q_P) (Esser et al. 2020); ``mse``: the grid search of
    :func:`_mse_step`. Per channel (dim 0) when ``per_channel`` (shape [C]), else shape [1].
    The result is detached, float32-or-x.dtype, and clamped to >= 1e-8.
    """
    _check_choice(method, INIT_METHODS, "init method")
    qn, qp = _qrange(bits, signed)
    with torch.no_grad():
        x2d = _channel_view(x.detach(), per_channel)
        if method == "lsq":
            s = 2 * x2d.abs().mean(dim=1) / math.sqrt(qp)
        else:
            if not per_channel and x2d.shape[1] > _MSE_MAX_ELEMS:
                stride = -(-x2d.shape[1] // _MSE_MAX_ELEMS)
                x2d = x2d[:, ::stride]
            s = _mse_step(x2d.float(), qn, qp, signed).to(x.dtype)
        return s.clamp_min(MIN_STEP)


def quantize_weight(w: torch.Tensor, bits: int, *, per_channel: bool = True,
                    method: str = "lsq") -> torch.Tensor:
    """Q_b(w) with the INITIAL step exactly as QAT starts (used for ||Q_b(W)-W||², docs/design.md §3)."""
    qn, qp = weight_qrange(bits)
    s = init_step(w, bits, signed=True, per_channel=per_channel, method=method)
    with torch.no_grad():
        return _fake_quant_ref(w.detach(), step_view(s, w, per_channel), qn, qp)


def step_view(step: torch.Tensor, x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Broadcast a [C] (per-channel, dim 0) or [1] step against x."""
    return step.view((-1,) + (1,) * (x.dim() - 1)) if per_channel else step


# --------------------------------------------------------------------------------------------
# Kernels: eager (few passes, no saved mask) and torch.compile (one fused pass each way)
# --------------------------------------------------------------------------------------------
_BACKEND = os.environ.get("HMQAT_QUANT_BACKEND", "eager")
if _BACKEND not in BACKENDS:  # a bad env var must not break import; fall back loudly
    warnings.warn(f"HMQAT_QUANT_BACKEND={_BACKEND!r} is not one of {BACKENDS}; using 'eager'")
    _BACKEND = "eager"
_COMPILED: dict[str, Callable] = {}
_COMPILE_MIN_NUMEL = 2 ** 16  # smaller tensors (most weights) stay eager: dynamo's per-call
#                               guard overhead (~0.1-0.2 ms) exceeds what fusion saves there
_COMPILE_FAILED = False


def set_backend(name: str) -> None:
    """Select the fake-quant kernels: "eager" (default) or "compile" (torch.compile-fused)."""
    global _BACKEND
    _BACKEND = _check_choice(name, BACKENDS, "quant backend")


def get_backend() -> str:
    """The active backend name ("eager" or "compile")."""
    return _BACKEND


def _eager_forward(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Eq. Q in 4 elementwise passes (one allocation): s·round(clamp(x/s, Q_N, Q_P))."""
    return torch.div(x, s).clamp_(qn, qp).round_().mul_(s)


def _eager_backward(grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor, s: torch.Tensor,
                    qn: int, qp: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """STE input gradient and the (unscaled) LSQ step gradient Σ grad·(q − v·mask).

    grad_x = grad where Q_N < v < Q_P (v = x/s recomputed; aten's hardtanh_backward is exactly
    this mask in one vectorised pass). The step gradient is Σ (grad·out − grad_x·x)/s, formed
    per element (mul, addcmul_) and then summed: taking the difference of two dot products
    instead loses ~1 % to cancellation at 8 bit.
    """
    gx = torch.ops.aten.hardtanh_backward(grad, torch.div(x, s), qn, qp)
    t = torch.mul(grad, out).addcmul_(gx, x, value=-1)
    if per_channel:
        gs = t.reshape(x.shape[0], -1).sum(dim=1) / s.reshape(-1)
    else:
        gs = (t.sum() / s).reshape(1)
    return gx, gs


def _fused_forward(x: torch.Tensor, s: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor
                   ) -> torch.Tensor:
    """Eq. Q as one expression (compiled into one pass). x is [C, M] or [1, M], s is [C, 1]."""
    return torch.round(torch.clamp(x / s, qn, qp)) * s


def _fused_backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qn: torch.Tensor,
                    qp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Recomputes v = x/s; returns (STE grad_x, per-row Σ grad·(round(clamp v) − v·mask))."""
    v = x / s
    m = (v > qn) & (v < qp)
    gx = torch.where(m, grad, 0.0)
    gs = (grad * (torch.round(torch.clamp(v, qn, qp)) - torch.where(m, v, 0.0))).sum(dim=1)
    return gx, gs


def _is_nhwc(t: torch.Tensor) -> bool:
    """True for a 4-d channels_last tensor that is not also NCHW-contiguous."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def _rows(t: torch.Tensor, per_channel: bool, nhwc: bool = False) -> torch.Tensor:
    """t as [C, M] (per channel) or [1, M] (a view in t's memory order when dense): the fixed
    rank keeps the compiled graphs to two."""
    if per_channel:
        return t.reshape(t.shape[0], -1)
    if nhwc:
        return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(1, -1)
    return t.reshape(1, -1)


def _unrows(r: torch.Tensor, shape: torch.Size, nhwc: bool) -> torch.Tensor:
    """Inverse of :func:`_rows` (an NHWC input gives a channels_last output)."""
    if nhwc:
        n, c, h, w = shape
        return r.view(n, h, w, c).permute(0, 3, 1, 2)
    return r.view(shape)


def _compiled(name: str) -> Callable | None:
    """torch.compile'd kernel ``name`` (built on first use), or None after a failure."""
    if _COMPILE_FAILED:
        return None
    if name not in _COMPILED:
        fn = _fused_forward if name == "forward" else _fused_backward
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def _run_compiled(name: str, *args: Any) -> Any:
    """Call a compiled kernel; on a compiler failure warn once and return None (use eager)."""
    global _COMPILE_FAILED
    fn = _compiled(name)
    if fn is None:
        return None
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - inductor/dynamo raise many types; eager reruns
        _COMPILE_FAILED = True
        warnings.warn(f"hmqat.quant: torch.compile backend failed ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); falling back to the eager backend")
        return None


class _LSQFunction(torch.autograd.Function):
    """Eq. Q with the STE input gradient and the LSQ step gradient times g (docs/design.md §3)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, step: torch.Tensor, qn: int, qp: int,
                grad_scale: float, per_channel: bool, bounds: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        s = step_view(step.clamp_min(MIN_STEP), x, per_channel)
        ctx.qn, ctx.qp, ctx.g, ctx.per_channel = qn, qp, grad_scale, per_channel
        out = None
        if _BACKEND == "compile" and x.numel() >= _COMPILE_MIN_NUMEL:
            s2 = s.reshape(-1, 1)
            ctx.nhwc = not per_channel and _is_nhwc(x)
            out = _run_compiled("forward", _rows(x, per_channel, ctx.nhwc), s2, *bounds)
        if out is not None:
            ctx.fused = True
            ctx.save_for_backward(x, s2, *bounds)
            return _unrows(out, x.shape, ctx.nhwc)
        out = _eager_forward(x, s, qn, qp)
        ctx.fused = False
        ctx.save_for_backward(x, s, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        res = None
        if ctx.fused:
            x, s2, qn_t, qp_t = ctx.saved_tensors
            pc = ctx.per_channel
            nhwc = ctx.nhwc
            res = _run_compiled("backward", _rows(grad, pc, nhwc), _rows(x, pc, nhwc), s2, qn_t,
                                qp_t)
            if res is None:  # compile failed between forward and backward
                s = step_view(s2.reshape(-1), x, pc)
                out = _eager_forward(x, s, ctx.qn, ctx.qp)
                res = _eager_backward(grad, x, out, s, ctx.qn, ctx.qp, pc)
            else:
                res = (_unrows(res[0], x.shape, nhwc), res[1])
        else:
            x, s, out = ctx.saved_tensors
            res = _eager_backward(grad, x, out, s, ctx.qn, ctx.qp, ctx.per_channel)
        gx, gs = res
        gx = gx if ctx.needs_input_grad[0] else None
        gs = (gs * ctx.g) if ctx.needs_input_grad[1] else None
        return gx, gs, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Quantizer module
# --------------------------------------------------------------------------------------------
_LAZY_INIT_SUSPENDED = 0
_SIGN_PASS = False   # inside calibrate_activations' first pass: observe signs, quantize nothing


@contextlib.contextmanager
def _suspend_lazy_init() -> Iterator[None]:
    """Within this block uninitialised activation quantizers neither init nor warn."""
    global _LAZY_INIT_SUSPENDED
    _LAZY_INIT_SUSPENDED += 1
    try:
        yield
    finally:
        _LAZY_INIT_SUSPENDED -= 1


@contextlib.contextmanager
def _sign_pass() -> Iterator[None]:
    """Within this block activation quantizers only observe their inputs' signs (pass-through)."""
    global _SIGN_PASS
    _SIGN_PASS = True
    try:
        yield
    finally:
        _SIGN_PASS = False


class LSQQuantizer(nn.Module):
    """LSQ fake quantizer (docs/design.md §3, Eq. Q) with a learned step ``step``.

    Args:
        bits: bit width in SUPPORTED_BITS.
        signed: signed symmetric range (weights, the image) or unsigned (post-ReLU activations).
        per_channel: one step per slice of dim 0 (``channels`` of them) instead of one.
        channels: number of steps when ``per_channel``.
        init: step init method, "lsq" or "mse" (see :func:`init_step`).
        auto_sign: (activations) decide ``signed`` from the data the step is initialised on:
            signed when more than NEG_TOLERANCE of those inputs are negative. Without it an
            unsigned quantizer only warns when it would clamp that many inputs to 0.
        is_weight: weight quantizers (re)initialise lazily in any mode; activation quantizers only
            in training mode or inside :func:`calibrate_activations`.

    ``enabled`` (attribute, default True): False makes the quantizer return its input unchanged
    (FP32 pass-through; the step gets no gradient), as the FP32 stage of a precision schedule
    needs (:mod:`hmqat.transitions`). It is run state, not in the state dict: the schedule that
    switched it restores it on resume.

    State dict: ``step`` [C] or [1] (Parameter), ``initialized``, ``is_signed`` (bool) and
    ``bit_width`` (uint8) buffers. Loading a state dict adopts its bit width and sign, so a
    checkpoint taken after a precision transition restores the bits that belong to its steps.
    """

    def __init__(self, bits: int, *, signed: bool, per_channel: bool = False, channels: int = 1,
                 init: str = "lsq", is_weight: bool = False, auto_sign: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.signed = bool(signed)
        self.auto_sign = bool(auto_sign) and not is_weight
        self.per_channel = bool(per_channel)
        self.init_method = _check_choice(init, INIT_METHODS, "init method")
        self.is_weight = bool(is_weight)
        n = int(channels) if per_channel else 1
        self.step = nn.Parameter(torch.ones(n, device=device, dtype=dtype))
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self.register_buffer("bit_width", torch.tensor(0, dtype=torch.uint8, device=device))
        self.register_buffer("is_signed", torch.tensor(self.signed, device=device))
        self._init_flag = False  # python mirror of `initialized` (no device sync per forward)
        self.bits = bits         # property: validates, sets bit_width and the kernel bounds
        self._pending_init: str | None = None
        self._calib: list[torch.Tensor] | None = None
        self._warned = False
        self._warned_clamp = False
        self.enabled = True      # False: FP32 pass-through (a precision schedule's FP32 stage)

    # -- ranges --------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Bit width (assigning it changes only the range; use set_bits to rescale the step)."""
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        self._bits = _check_bits(value)
        self.bit_width.fill_(self._bits)
        self._bounds = self._make_bounds()

    @property
    def qn(self) -> int:
        """Lowest integer code Q_N."""
        return _qrange(self.bits, self.signed)[0]

    @property
    def qp(self) -> int:
        """Highest integer code Q_P."""
        return _qrange(self.bits, self.signed)[1]

    def _make_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        qn, qp = _qrange(self.bits, self.signed)
        dev = self.step.device
        return torch.tensor(float(qn), device=dev), torch.tensor(float(qp), device=dev)

    def _apply(self, fn, recurse=True):  # keep the compile-kernel bounds on the step's device
        out = super()._apply(fn, recurse)
        self._bounds = self._make_bounds()
        return out

    # -- initialisation ------------------------------------------------------------------------
    def mark_initialized(self, flag: bool = True) -> None:
        """Set the ``initialized`` flag (False makes the next eligible forward re-init the step)."""
        self.initialized.fill_(bool(flag))
        self._init_flag = bool(flag)

    def initialize(self, x: torch.Tensor, method: str | None = None) -> None:
        """Set the step from data ``x`` with :func:`init_step` (in place: optimizers keep it).
        ``method`` defaults to a pending set_bits re-init method, else ``init_method``."""
        self._observe_sign(x)
        s = init_step(x, self.bits, signed=self.signed, per_channel=self.per_channel,
                      method=method or self._pending_init or self.init_method)
        with torch.no_grad():
            self.step.copy_(s.reshape(self.step.shape))
        self._pending_init = None
        self.mark_initialized(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state dicts written before the bit_width buffer existed keep the current bits
        # (the same back-compat device BatchNorm uses for num_batches_tracked)
        state_dict.setdefault(prefix + "bit_width", self.bit_width.detach().clone())
        state_dict.setdefault(prefix + "is_signed", self.is_signed.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._init_flag = bool(self.initialized)
        if bool(self.is_signed) != self.signed:
            self._set_signed(bool(self.is_signed))
        if int(self.bit_width) != self._bits:
            self.bits = int(self.bit_width)

    def set_bits(self, new_bits: int, reinit: str = "range", x: torch.Tensor | None = None) -> None:
        """Change the bit width (docs/design.md §3 "Precision transitions").

        ``range``: s_new = s_old·Q_P(old)/Q_P(new), so the clipping range s·Q_P carries over.
        ``mse``/``lsq``: re-initialise from ``x`` if given, else lazily from the next batch
        (weights: the next forward). The step is updated in place, so an optimizer holding it
        keeps working (its momentum state is the caller's to reset).
        """
        new_bits = _check_bits(new_bits, "set_bits")
        _check_choice(reinit, REINIT_METHODS, "reinit")
        old_qp = self.qp
        self.bits = new_bits
        if reinit == "range":
            with torch.no_grad():
                self.step.mul_(old_qp / self.qp)
        elif x is not None:
            self.initialize(x, reinit)
        else:
            self._pending_init = reinit
            self.mark_initialized(False)

    # -- forward -------------------------------------------------------------------------------
    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ g = 1/sqrt(N·Q_P), N = elements sharing one step (see module docstring)."""
        if self.is_weight:
            n = x[0].numel() if self.per_channel else x.numel()
        else:
            n = x[0].numel() if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(max(n, 1) * self.qp)

    def _set_signed(self, signed: bool) -> None:
        self.signed = bool(signed)
        self.is_signed.fill_(self.signed)
        self._bounds = self._make_bounds()

    def _observe_sign(self, x: torch.Tensor) -> bool:
        """Check the share of negative inputs ``x`` against NEG_TOLERANCE (docs/method.md §2).

        An ``auto_sign`` quantizer that is unsigned becomes signed (returns True: earlier
        unsigned step estimates are void); a fixed unsigned one warns once that it clamps them.
        """
        if self.is_weight or self.signed:
            return False
        frac = float((x.detach() < 0).float().mean()) if x.numel() else 0.0
        if frac <= NEG_TOLERANCE:
            return False
        if self.auto_sign:
            self._set_signed(True)
            return True
        if not self._warned_clamp:
            warnings.warn(f"LSQQuantizer: unsigned activation quantizer clamps {frac:.1%} of its "
                          "inputs (negative values) to 0; quantize with act_sign='auto' (the "
                          "default) so this layer gets a signed range")
            self._warned_clamp = True
        return False

    def _calibrate(self, x: torch.Tensor) -> None:
        """Accumulate per-batch init estimates; the step is their running mean."""
        assert self._calib is not None
        if self._observe_sign(x):
            self._calib.clear()  # the estimates so far were for the unsigned range
        est = init_step(x, self.bits, signed=self.signed, per_channel=self.per_channel,
                        method=self.init_method)
        self._calib.append(est)
        with torch.no_grad():
            self.step.copy_(torch.stack(self._calib).mean(0).reshape(self.step.shape))
        self.mark_initialized(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:     # FP32 pass-through: the input unchanged, the step gets no gradient
            return x
        if _SIGN_PASS and not self.is_weight:
            if self._calib is not None:  # only the quantizers being calibrated decide their sign
                self._observe_sign(x)
            return x
        if self._calib is not None:
            self._calibrate(x)
        elif not self._init_flag:
            if self.is_weight or (self.training and not _LAZY_INIT_SUSPENDED):
                self.initialize(x)
            else:
                if not self._warned and not _LAZY_INIT_SUSPENDED:
                    warnings.warn("LSQQuantizer: activation step not initialised (no training "
                                  "batch seen yet); passing activations through unquantized. "
                                  "Call hmqat.quant.calibrate_activations(model, batches).")
                    self._warned = True
                return x
        return _LSQFunction.apply(x, self.step, self.qn, self.qp, self.grad_scale(x),
                                  self.per_channel, self._bounds)

    def step_like(self, x: torch.Tensor) -> torch.Tensor:
        """The detached step, clamped to :data:`MIN_STEP` as the forward does, broadcast
        against ``x`` ([C, 1, ...] per channel, [1] per tensor)."""
        return step_view(self.step.detach().clamp_min(MIN_STEP), x, self.per_channel)

    @torch.no_grad()
    def int_repr(self, x: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Integer codes round(clamp(x/s, Q_N, Q_P)) as ``dtype`` (export, oscillation tracking)."""
        s = self.step_like(x)
        return torch.clamp(x / s, self.qn, self.qp).round_().to(dtype)

    def extra_repr(self) -> str:
        kind = "per_channel" if self.per_channel else "per_tensor"
        auto = ", auto_sign" if self.auto_sign else ""
        return (f"bits={self.bits}, signed={self.signed}{auto}, {kind}, steps={self.step.numel()}, "
                f"init={self.init_method}" + ("" if self.enabled else ", disabled (FP32)"))


# --------------------------------------------------------------------------------------------
# Quantized layers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized: weight bits, input-activation bits (None = FP), signedness."""

    w_bits: int
    a_bits: int | None
    a_signed: bool = False
    per_channel: bool = True
    init: str = "lsq"
    a_auto_sign: bool = False


class _QuantMixin:
    """Shared parts of QConv2d / QLinear: quantizers, w_bits, quantized_weight()."""

    weight: nn.Parameter
    weight_quantizer: LSQQuantizer
    act_quantizer: LSQQuantizer | None

    def _adopt(self, mod: nn.Module, spec: LayerSpec):
        """Take ``mod``'s weight/bias Parameters (shared, not copied), add quantizers, copy mode."""
        self.weight = mod.weight
        self.bias = mod.bias
        self._make_quantizers(spec)
        self.train(mod.training)
        return self

    def _make_quantizers(self, spec: LayerSpec) -> None:
        w = self.weight
        self.weight_quantizer = LSQQuantizer(spec.w_bits, signed=True, per_channel=spec.per_channel,
                                             channels=w.shape[0], init=spec.init, is_weight=True,
                                             device=w.device, dtype=w.dtype)
        self.weight_quantizer.initialize(w)
        self.act_quantizer = None
        if spec.a_bits is not None:
            self.act_quantizer = LSQQuantizer(spec.a_bits, signed=spec.a_signed,
                                              per_channel=False, init=spec.init,
                                              auto_sign=spec.a_auto_sign, device=w.device,
                                              dtype=w.dtype)

    @property
    def w_bits(self) -> int:
        """Bit width of the weight quantizer."""
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int | None:
        """Bit width of the input-activation quantizer (None: FP input)."""
        return None if self.act_quantizer is None else self.act_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantized weight Q(W) (differentiable w.r.t. weight and step)."""
        return self.weight_quantizer(self.weight)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quantizer is None else self.act_quantizer(x)


class QConv2d(_QuantMixin, nn.Conv2d):
    """nn.Conv2d with LSQ fake quantization of its weight and (optionally) its input."""

    @classmethod
    def from_float(cls, mod: nn.Conv2d, spec: LayerSpec) -> QConv2d:
        """Wrap ``mod`` (its weight/bias Parameters are reused, not copied)."""
        q = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode, device="meta",
                dtype=mod.weight.dtype)
        return q._adopt(mod, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)


class QLinear(_QuantMixin, nn.Linear):
    """nn.Linear with LSQ fake quantization of its weight and (optionally) its input."""

    @classmethod
    def from_float(cls, mod: nn.Linear, spec: LayerSpec) -> QLinear:
        """Wrap ``mod`` (its weight/bias Parameters are reused, not copied)."""
        q = cls(mod.in_features, mod.out_features, mod.bias is not None, device="meta",
                dtype=mod.weight.dtype)
        return q._adopt(mod, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)


_QLAYERS = (QConv2d, QLinear)


def is_quantized(model: nn.Module) -> bool:
    """True if ``model`` contains QConv2d/QLinear layers."""
    return any(isinstance(m, _QLAYERS) for m in model.modules())


def quantized_layers(model: nn.Module) -> dict[str, QConv2d | QLinear]:
    """{module name: QConv2d/QLinear} in module-registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QLAYERS)}


def bit_config_of(model: nn.Module) -> dict[str, int]:
    """The weight bit config {layer: bits} of a quantized model."""
    return {n: m.w_bits for n, m in quantized_layers(model).items()}


def act_bits_of(model: nn.Module) -> dict[str, int | None]:
    """{layer: input-activation bits or None} of a quantized model."""
    return {n: m.a_bits for n, m in quantized_layers(model).items()}


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every LSQ step Parameter (weight and activation quantizers), for their own param group."""
    return [m.step for m in model.modules() if isinstance(m, LSQQuantizer)]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every Parameter that is not an LSQ step (weights, biases, BN affine)."""
    steps = {id(p) for p in quantizer_parameters(model)}
    return [p for p in model.parameters() if id(p) not in steps]


# --------------------------------------------------------------------------------------------
# Bit configs
# --------------------------------------------------------------------------------------------
def _check_policy(policy: str) -> str:
    return _check_choice(policy, POLICIES, "policy")


DEFAULT_INPUT_SIZE: tuple[int, ...] = (1, 3, 32, 32)
InputSize = tuple[int, ...]


def _layers(model: nn.Module, input_size: InputSize = DEFAULT_INPUT_SIZE) -> list[LayerInfo]:
    """quantizable_layers (forward order, one probe forward pass of ``input_size``) without
    touching uninitialised activation quantizers."""
    with _suspend_lazy_init():
        return quantizable_layers(model, input_size=input_size)


def _fixed_from(names: list[str], policy: str) -> dict[str, int]:
    if _check_policy(policy) == "none" or not names:
        return {}
    return {names[0]: 8, names[-1]: 8}


def _act_bits_from(names: list[str], a_bits: int | None, policy: str) -> dict[str, int | None]:
    """The one place of the rule "the first layer's input (the signed image) at 8 bits under
    first_last_8": ``a_bits`` for every layer, 8 for ``names[0]`` under that policy; None
    everywhere when ``a_bits`` is None (FP inputs)."""
    if a_bits is None:
        return {n: None for n in names}
    a = _check_bits(a_bits, "a_bits")
    out: dict[str, int | None] = {n: a for n in names}
    if _check_policy(policy) == "first_last_8" and names:
        out[names[0]] = 8
    return out


def quantizer_steps(layers: Iterable[LayerInfo], *, per_channel: bool,
                    a_bits: int | None) -> int:
    """Step-size parameters QAT adds to ``layers``: out_channels per weight quantizer when
    ``per_channel`` (else one), plus one per input-activation quantizer when ``a_bits`` is set
    (docs/method.md, size accounting)."""
    layers = list(layers)
    steps = sum(i.weight_shape[0] if per_channel else 1 for i in layers)
    return steps + (len(layers) if a_bits is not None else 0)


def fixed_layers(model: nn.Module, policy: str = "first_last_8", *,
                 input_size: InputSize = DEFAULT_INPUT_SIZE) -> dict[str, int]:
    """{name: 8} for the first and last quantizable layers (forward order) under first_last_8.

    ``input_size`` is the probe input that finds the forward order (any size the model accepts).
    """
    _check_policy(policy)
    if policy == "none":
        return {}
    return _fixed_from([info.name for info in _layers(model, input_size)], policy)


def uniform_config(model: nn.Module, bits: int, policy: str = "first_last_8", *,
                   input_size: InputSize = DEFAULT_INPUT_SIZE) -> dict[str, int]:
    """Every quantizable layer at ``bits`` except the policy's fixed layers (docs/design.md §4)."""
    b = _check_bits(bits)
    names = [info.name for info in _layers(model, input_size)]
    cfg = {name: b for name in names}
    cfg.update(_fixed_from(names, policy))
    return cfg


def _config_errors(names: list[str], config: Mapping[str, Any], fixed: Mapping[str, int],
                   policy: str, model_name: str) -> list[str]:
    """Every problem of ``config`` for layers ``names`` (docs/design.md §4), one message per key."""
    if not isinstance(config, Mapping):
        raise BitConfigError(f"bit config must be a dict {{layer name: bits}}, got "
                             f"{type(config).__name__}")
    known = set(names)
    errors: list[str] = []
    for key, value in config.items():
        if key not in known:
            errors.append(f"unknown layer {key!r}: not a Conv2d/Linear of {model_name}; valid "
                          f"names start {names[:4]}")
            continue
        try:
            b = _check_bits(value, f"layer {key!r}")
        except BitConfigError as exc:
            errors.append(str(exc))
            continue
        if key in fixed and b != fixed[key]:
            errors.append(f"layer {key!r}: policy {policy!r} fixes the first conv and last linear "
                          f"at 8 bits, got {b}; set it to 8 or pass policy='none'")
    for name in names:
        if name not in config:
            errors.append(f"missing layer {name!r}: the config must give bits for every "
                          f"quantizable layer (start from uniform_config(model, bits))")
    return errors


def _raise_errors(errors: list[str]) -> None:
    if errors:
        raise BitConfigError("invalid bit config:\n  " + "\n  ".join(errors))


def validate_bit_config(model: nn.Module, config: Mapping[str, Any], *,
                        policy: str = "first_last_8", raise_errors: bool = True,
                        input_size: InputSize = DEFAULT_INPUT_SIZE) -> list[str]:
    """Check ``config`` against ``model`` (docs/design.md §4): unknown names, missing layers, unsupported
    bits, policy conflicts. Raises one BitConfigError listing every problem (or returns the list
    when ``raise_errors=False``; empty means valid)."""
    _check_policy(policy)
    names = [info.name for info in _layers(model, input_size)]
    errors = _config_errors(names, config, _fixed_from(names, policy), policy,
                            type(model).__name__)
    if raise_errors:
        _raise_errors(errors)
    return errors


def act_bits_config(model: nn.Module, a_bits: int | None, policy: str = "first_last_8", *,
                    input_size: InputSize = DEFAULT_INPUT_SIZE) -> dict[str, int | None]:
    """Input-activation bits per layer: a_bits everywhere, the first layer at 8 under
    first_last_8 (its signed image input); None everywhere when a_bits is None (FP inputs)."""
    _check_policy(policy)
    return _act_bits_from([info.name for info in _layers(model, input_size)], a_bits, policy)


def save_config(config: Mapping[str, int], path: str | os.PathLike) -> None:
    """Write a bit config as JSON {"layer": bits, ...} atomically (docs/design.md §4)."""
    clean = {str(k): _check_bits(v, f"layer {k!r}") for k, v in config.items()}
    atomic_write_bytes(path, (json.dumps(clean, indent=1) + "\n").encode())


def load_config(path: str | os.PathLike) -> dict[str, int]:
    """Read a JSON bit config; every value must be an int in SUPPORTED_BITS."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise BitConfigError(f"{path}: not valid JSON ({exc}); a bit config is "
                             '{"layer.name": bits, ...}') from exc
    if not isinstance(data, dict):
        raise BitConfigError(f"{path}: a bit config must be a JSON object "
                             f'{{"layer.name": bits}}, got {type(data).__name__}')
    return {k: _check_bits(v, f"{path}: layer {k!r}") for k, v in data.items()}


# --------------------------------------------------------------------------------------------
# Model conversion
# --------------------------------------------------------------------------------------------
def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_quantized(model: nn.Module, specs: Mapping[str, LayerSpec]) -> nn.Module:
    """Deep-copy ``model`` and swap each named Conv2d/Linear for QConv2d/QLinear per ``specs``."""
    qmodel = copy.deepcopy(model)
    for name, spec in specs.items():
        mod = qmodel.get_submodule(name)
        if isinstance(mod, nn.Conv2d):
            new: nn.Module = QConv2d.from_float(mod, spec)
        elif isinstance(mod, nn.Linear):
            new = QLinear.from_float(mod, spec)
        else:  # pragma: no cover - names come from quantizable_layers
            raise BitConfigError(f"layer {name!r} is {type(mod).__name__}, not Conv2d/Linear")
        replace_module(qmodel, name, new)
    return qmodel


def quantize_model(model: nn.Module, bit_config: Mapping[str, int], *, a_bits: int | None = 4,
                   policy: str = "first_last_8", per_channel: bool = True, init: str = "lsq",
                   act_sign: str = "auto",
                   input_size: InputSize = DEFAULT_INPUT_SIZE) -> nn.Module:
    """A NEW model (deep copy; ``model`` untouched) with every Conv2d/Linear replaced by
    QConv2d/QLinear at the config's weight bits (docs/design.md §3). BatchNorm and all other modules are
    kept as they are (forward hooks on the replaced layers are not carried over).

    Input activations: the first layer's input (the image, signed) gets a signed quantizer (8 bit
    under first_last_8, else a_bits); every other layer one at ``a_bits`` whose sign follows
    ``act_sign``: "auto" decides from the calibration / first training batch (signed when more
    than NEG_TOLERANCE = 1 % of its inputs are negative, docs/method.md §2), "unsigned" assumes
    post-ReLU inputs (and warns when that clamps more than 1 %), "signed" makes all signed.
    ``a_bits=None`` quantizes weights only. Weight steps are initialised now (``init``);
    activation steps on the first training batch or by :func:`calibrate_activations`.
    ``input_size``: the probe input that finds the layers' forward order.
    """
    if is_quantized(model):
        raise BitConfigError("quantize_model: the model is already quantized (has QConv2d/"
                             "QLinear); pass the FP32 model, or use set_bit_config to change bits")
    _check_choice(init, INIT_METHODS, "init")
    _check_choice(act_sign, ACT_SIGNS, "act_sign")
    _check_policy(policy)
    names = [info.name for info in _layers(model, input_size)]
    _raise_errors(_config_errors(names, bit_config, _fixed_from(names, policy), policy,
                                 type(model).__name__))
    abits = _act_bits_from(names, a_bits, policy)
    specs = {name: LayerSpec(int(bit_config[name]), abits[name],
                             a_signed=(i == 0 or act_sign == "signed"), per_channel=per_channel,
                             init=init, a_auto_sign=(i > 0 and act_sign == "auto"))
             for i, name in enumerate(names)}
    return build_quantized(model, specs)


def set_bit_config(qmodel: nn.Module, config: Mapping[str, int], *, reinit: str = "range",
                   policy: str = "none") -> nn.Module:
    """Change the weight bits of a quantized model in place (precision transitions, docs/design.md §3),
    using :meth:`LSQQuantizer.set_bits` (``range`` keeps each layer's clipping range).
    ``policy="first_last_8"`` also checks that the first/last layers (as built) stay at 8."""
    layers = quantized_layers(qmodel)
    if not layers:
        raise BitConfigError("set_bit_config: the model has no QConv2d/QLinear; call "
                             "quantize_model first")
    _check_choice(reinit, REINIT_METHODS, "reinit")
    names = _forward_order(qmodel)
    _raise_errors(_config_errors(names, config, _fixed_from(names, policy), policy,
                                 type(qmodel).__name__))
    for name, layer in layers.items():
        b = int(config[name])
        if b != layer.w_bits:
            layer.weight_quantizer.set_bits(b, reinit, x=None if reinit == "range"
                                            else layer.weight.detach())
    return qmodel


def _forward_order(qmodel: nn.Module) -> list[str]:
    """Quantized layer names with the first layer (the one with a signed input quantizer, as
    quantize_model builds it) first and the last linear last; no forward pass needed."""
    layers = quantized_layers(qmodel)
    names = list(layers)
    first = [n for n, m in layers.items() if m.act_quantizer is not None
             and m.act_quantizer.signed and not m.act_quantizer.auto_sign]
    if len(first) == 1:
        names.remove(first[0])
        names.insert(0, first[0])
    return names


def as_input(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"calibrate_activations: a batch must be a tensor or an (x, y) pair, got "
                    f"{type(batch).__name__}")


def calibrate_activations(qmodel: nn.Module, batches: Iterable[Any], *,
                          max_batches: int | None = None, method: str | None = None,
                          quantizers: Iterable[LSQQuantizer] | None = None) -> nn.Module:
    """Initialise every activation step from ``batches`` (tensors or (x, y) pairs).

    Runs the model in eval mode without gradients (BN statistics untouched). A first pass over
    the batches with every activation quantizer passing its input through decides the signs
    (``act_sign="auto"``: signed when more than NEG_TOLERANCE of the FP inputs are negative,
    docs/method.md §2). In the second pass each activation quantizer's step becomes the mean of
    its per-batch :func:`init_step` estimates, and the inputs of later layers see the
    already-quantized earlier ones. ``method`` overrides each quantizer's init method
    ("lsq"/"mse"). ``quantizers`` restricts the calibration (sign and step) to these activation
    quantizers of ``qmodel`` (the others keep their signs and steps; a precision transition
    re-initialises only the ones whose width changed). Returns ``qmodel``.
    """
    acts = [m for m in qmodel.modules() if isinstance(m, LSQQuantizer) and not m.is_weight]
    if quantizers is not None:
        wanted = {id(q) for q in quantizers}
        acts = [q for q in acts if id(q) in wanted]
    if not acts:
        return qmodel
    if method is not None:
        _check_choice(method, INIT_METHODS, "method")
    p = next(qmodel.parameters())
    was_training = qmodel.training
    saved_methods = [q.init_method for q in acts]
    try:
        for q in acts:
            q._calib = []
            if method is not None:
                q.init_method = method
        qmodel.eval()
        inputs = [as_input(b) for b in itertools.islice(batches, max_batches)]
        with torch.no_grad():
            with _sign_pass():  # signs from the FP inputs: no cascade of earlier quantization
                for x in inputs:
                    qmodel(x.to(device=p.device, dtype=p.dtype))
            for x in inputs:
                qmodel(x.to(device=p.device, dtype=p.dtype))
        if not inputs:
            raise ValueError("calibrate_activations: no batches given; pass a list of input "
                             "tensors or (x, y) pairs")
    finally:
        for q, m in zip(acts, saved_methods):
            q._calib = None
            q.init_method = m
        qmodel.train(was_training)
    return qmodel


def clamped_negative_fraction(qmodel: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """{layer: share of its inputs that its activation quantizer clamps to 0 because they are
    negative and the quantizer is unsigned} over ``batches`` (eval mode, no gradients); 0.0 for
    signed quantizers. The check behind ``act_sign="auto"`` (docs/method.md §2)."""
    layers = {n: m for n, m in quantized_layers(qmodel).items() if m.act_quantizer is not None}
    counts = {n: [0, 0] for n in layers}

    def hook(name: str) -> Callable:
        def record(mod: LSQQuantizer, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            counts[name][0] += 0 if mod.signed else int((x < 0).sum())
            counts[name][1] += x.numel()
        return record

    handles = [m.act_quantizer.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    p = next(qmodel.parameters())
    was_training = qmodel.training
    try:
        qmodel.eval()
        with torch.no_grad():
            for batch in batches:
                qmodel(as_input(batch).to(device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    return {n: c[0] / max(c[1], 1) for n, c in counts.items()}


# --------------------------------------------------------------------------------------------
# Accounting (HAWQ-V3, docs/design.md §3 Eq. S and Eq. B)
# --------------------------------------------------------------------------------------------
def _n_params(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def fp32_size_mb(model: nn.Module) -> float:
    """FP32 size: 4 bytes × every parameter except LSQ steps, in MB = 2^20 bytes."""
    return 4 * _n_params(weight_parameters(model)) / MB


def _size_bytes(model: nn.Module, config: Mapping[str, int] | None, a_bits: int | None,
                per_channel: bool, input_size: InputSize) -> float:
    """Eq. S: Σ n_i b_i / 8 + 4 · other parameters (biases, BN affine, steps)."""
    qlayers = quantized_layers(model)
    if qlayers:  # steps are real parameters of the model; no probe forward needed
        names = list(qlayers)
        n_w = {n: m.weight.numel() for n, m in qlayers.items()}
        config = bit_config_of(model) if config is None else config
        other = _n_params(model.parameters()) - sum(n_w.values())
    else:
        if config is None:
            return 4.0 * _n_params(model.parameters())
        infos = _layers(model, input_size)
        names = [i.name for i in infos]
        n_w = {i.name: i.n_params for i in infos}
        if a_bits is not None:
            _check_bits(a_bits, "a_bits")
        steps = quantizer_steps(infos, per_channel=per_channel, a_bits=a_bits)
        other = _n_params(model.parameters()) - sum(n_w.values()) + steps
    _raise_errors(_config_errors(names, config, {}, "none", type(model).__name__))
    return sum(n * int(config[name]) for name, n in n_w.items()) / 8 + 4.0 * other


def model_size_mb(model: nn.Module, config: Mapping[str, int] | None = None,
                  a_bits: int | None = None, *, per_channel: bool = True,
                  input_size: InputSize = DEFAULT_INPUT_SIZE) -> float:
    """Model size in MB (2^20 bytes) by HAWQ-V3's convention (docs/design.md §3, Eq. S).

    * FP32 model, ``config=None``: 4·(all parameters).
    * FP32 model + config: Σ n_i b_i/8 + 4·(biases, BN affine, weight steps — out_channels per
      layer when ``per_channel`` else 1 — and one step per activation quantizer if ``a_bits``).
    * Quantized model: its own bits (or ``config``) and its actual step parameters.
    BN running statistics are buffers, not parameters, and are not counted.
    """
    return _size_bytes(model, config, a_bits, per_channel, input_size) / MB


def compression_ratio(model: nn.Module, config: Mapping[str, int] | None = None,
                      a_bits: int | None = None, *, per_channel: bool = True,
                      input_size: InputSize = DEFAULT_INPUT_SIZE) -> float:
    """FP32 size / quantized size (docs/design.md §3)."""
    return fp32_size_mb(model) / model_size_mb(model, config, a_bits, per_channel=per_channel,
                                               input_size=input_size)


def bops(model: nn.Module, config: Mapping[str, int] | None = None, a_bits: int | None = None, *,
         policy: str = "first_last_8", input_size: InputSize = DEFAULT_INPUT_SIZE) -> int:
    """Bit operations per sample, Σ_i MACs_i · b_i · a_i (docs/design.md §3, Eq. B).

    Weight bits b_i from ``config`` (a quantized model's own bits when None; 32 for an FP32
    model). Activation bits a_i: a quantized model's own quantizers (32 where FP); otherwise
    a_bits with the first layer at 8 under first_last_8, 32 when ``a_bits`` is None.
    MACs come from ``quantizable_layers(model, input_size)``: pass the real input size.
    """
    _check_policy(policy)
    layers = _layers(model, input_size)
    names = [i.name for i in layers]
    quantized = is_quantized(model)
    if config is None and quantized:
        config = bit_config_of(model)
    if config is not None:
        _raise_errors(_config_errors(names, config, {}, "none", type(model).__name__))
    abits = act_bits_of(model) if quantized else _act_bits_from(names, a_bits, policy)
    total = 0
    for info in layers:
        wb = 32 if config is None else int(config[info.name])
        ab = abits.get(info.name) or 32
        total += info.macs * wb * ab
    return total

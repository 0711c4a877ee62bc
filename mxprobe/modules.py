"""MX modules: Linear, LayerNorm, RMSNorm, activations and attention products that read their
precision from a :class:`PrecisionScheme` at call time.

The modules are the torch classes themselves with a different ``forward``: ``convert`` turns an
``nn.Linear`` into an :class:`MxLinear` by reassigning its ``__class__``, so parameters, hooks and
``state_dict`` keys are the very same objects. A precision switch is an attribute change
(``module.mx_scheme = ...``); ``mx_scheme = None`` or ``mx_enabled = False`` means full precision.

``MxLinear`` quantizes exactly the six GEMM operands of docs/numerics.md (X flattened to 2-D with
tokens on axis 0):

- forward      ``Y  = Q_act(X, -1) @ Q_weight(W, -1)^T``
- grad input   ``dX = Q_grad_dgrad(dY, -1) @ Q_weight_bp(W, 0)``
- grad weight  ``dW = Q_grad_wgrad(dY, 0)^T @ Q_act_bp(X, 0)`` (with ``nvrht=on`` and an NVFP4
  role there, ``dY`` and ``X`` are first multiplied by this step's random Hadamard matrix along
  the token axis: :mod:`mxprobe.hadamard`)

GEMM outputs and the bias are rounded by the ``elementwise`` role when set; with
``quantize_backprop=False`` the backward pass is left in full precision.

Norms have one mechanism, :class:`MxNorm`, for torch's (``MxLayerNorm``, ``MxRMSNorm``) and any
library's (``adapters.py`` puts it under the ``norm`` kind): the class's own forward, run with
γ/β :func:`substituted` by their ``forward_parameter`` values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from mxprobe import nvfp4_random
from mxprobe.formats import NVFP4, is_mx
from mxprobe.hadamard import random_hadamard
from mxprobe.kernels import OperandBuffers, mx_gemm, tensor_core_exact
from mxprobe.nvfp4 import quantize_nvfp4
from mxprobe.quantize import quantize_mx, round_to, round_to_owned
from mxprobe.scheme import BACKWARD_ROLES, GEMM_ROLES, PrecisionScheme


class NotEmulatedError(RuntimeError):
    """A computation mxprobe refuses to run because it cannot emulate it on MX operands (a
    fused product, a weight of unknown role, expert parallelism): raised, never run in full
    precision behind the user's back. The message names the module and what to do."""


# The memory of the MX products' quantized operands (index 0 and 1: the two operands of one
# product), per thread. Each operand is consumed in the forward or backward body that
# quantizes it; a buffer something still refers to is never reused (OperandBuffers).
_OPERANDS = OperandBuffers()


def quantize_role(
    t: torch.Tensor,
    scheme: PrecisionScheme,
    role: str,
    axis: int = -1,
    operand: int | None = None,
) -> torch.Tensor:
    """``t`` in the format ``scheme`` gives ``role``: MX along ``axis``, elementwise, or as is.

    ``operand`` (0 or 1: which operand of a product) marks a GEMM operand consumed by the body
    that quantizes it: an MX result is then written into this thread's operand buffer of that
    index (``mxprobe.kernels.OperandBuffers``) instead of fresh memory."""
    fmt = getattr(scheme, role)
    if fmt == "fp32":
        return t
    if fmt == NVFP4:
        return _NVFP4StraightThrough.apply(t, *nvfp4_settings(scheme, role, t.dim()), axis)
    if is_mx(fmt):
        return quantize_mx(
            t,
            fmt,
            block_size=scheme.block_size,
            axis=axis,
            scale_mode=scheme.scale_mode,
            rounding=scheme.rounding,
            out=None if operand is None else _OPERANDS.out_for(operand, t),
        )
    return round_to(t, fmt)


WEIGHT_ROLES = ("weight", "weight_bp")
GRAD_ROLES = ("grad_wgrad", "grad_dgrad")


def nvfp4_settings(scheme: PrecisionScheme, role: str, dim: int = 2) -> tuple:
    """(tensor_scale, tile, rounding) of an NVFP4 ``role`` under ``scheme`` for a tensor of
    ``dim`` dimensions: 16x16 tiles only for weight roles of matrices, stochastic rounding only
    for gradient roles."""
    tile = (
        (16, 16)
        if role in WEIGHT_ROLES and scheme.nvfp4_weight_tile == "16x16" and dim >= 2
        else (1, 16)
    )
    rounding = scheme.nvfp4_grad_rounding if role in GRAD_ROLES else "even"
    return ("amax" if scheme.nvfp4_scale == "amax" else None), tile, rounding


class _NVFP4StraightThrough(torch.autograd.Function):
    """``quantize_nvfp4`` with the gradient passed straight through (as ``quantize_mx``)."""

    @staticmethod
    def forward(ctx, t, tensor_scale, tile, rounding, axis):
        generator = nvfp4_random.rounding_generator(t.device) if rounding == "stochastic" else None
        return quantize_nvfp4(
            t, axis=axis, tensor_scale=tensor_scale, tile=tile, rounding=rounding,
            generator=generator,
        )  # fmt: skip

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    scheme: PrecisionScheme,
    roles: tuple[str, str],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a @ b`` of operands quantized by ``roles``: on TF32 tensor cores (CUDA) when both
    roles' formats make that exact, see ``mxprobe.kernels.gemm``."""
    exact = all(tensor_core_exact(getattr(scheme, r), scheme.scale_mode) for r in roles)
    return mx_gemm(a, b, bias, exact_tf32=exact)


def round_elementwise(t: torch.Tensor, scheme: PrecisionScheme) -> torch.Tensor:
    return round_to(t, scheme.elementwise)


def round_fresh(t: torch.Tensor, scheme: PrecisionScheme) -> torch.Tensor:
    """``round_elementwise`` of a tensor just made here (a GEMM output): in place if possible."""
    return round_to_owned(t, scheme.elementwise)


class _MxLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, scheme):
        ctx.scheme = scheme
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2d, weight)
        xq = quantize_role(x2d, scheme, "act", -1, operand=0)
        wq = quantize_role(weight, scheme, "weight", -1, operand=1)
        if scheme.elementwise == "fp32":
            # bias fused as nn.Linear does (same fp32 rounding)
            return gemm(xq, wq.t(), scheme, ("act", "weight"), bias)
        y = round_fresh(gemm(xq, wq.t(), scheme, ("act", "weight")), scheme)
        if bias is not None:
            y = round_fresh(y + round_elementwise(bias, scheme), scheme)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight = ctx.saved_tensors
        s = ctx.scheme
        dx = dw = db = None
        if s.quantize_backprop:
            if ctx.needs_input_grad[0]:
                dx = gemm(
                    quantize_role(dy, s, "grad_dgrad", -1, operand=0),
                    quantize_role(weight, s, "weight_bp", 0, operand=1),
                    s,
                    ("grad_dgrad", "weight_bp"),
                )
                dx = round_fresh(dx, s)
            if ctx.needs_input_grad[1]:
                g, a = _wgrad_operands(dy, x2d, s)
                dw = gemm(
                    quantize_role(g, s, "grad_wgrad", 0, operand=0).t(),
                    quantize_role(a, s, "act_bp", 0, operand=1),
                    s,
                    ("grad_wgrad", "act_bp"),
                )
                dw = round_fresh(dw, s)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = round_fresh(dy.sum(0), s)
        else:
            dx = dy @ weight if ctx.needs_input_grad[0] else None
            dw = dy.t() @ x2d if ctx.needs_input_grad[1] else None
            db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def _wgrad_operands(dy, x2d, s: PrecisionScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """dY and X as the weight-gradient GEMM quantizes them: rotated by this step's random
    Hadamard matrix along the token axis when ``s`` asks for it (both by the same matrix, so
    their product is dYᵀX up to rounding)."""
    if s.nvfp4_wgrad_rht == "off" or NVFP4 not in (s.grad_wgrad, s.act_bp):
        return dy, x2d
    signs = nvfp4_random.hadamard_signs(dy.device)
    return random_hadamard(dy, signs, 0), random_hadamard(x2d, signs, 0)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives a GEMM on ``x``'s device now, or ``None`` outside autocast."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def mx_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scheme: PrecisionScheme
) -> torch.Tensor:
    """``F.linear`` with every GEMM operand quantized as ``scheme`` says (see module docstring).

    Under autocast (bf16-mixed, 16-mixed) the operands are first cast as autocast casts a
    GEMM's (X, W and b to the autocast dtype), then quantized from that dtype; every product
    runs in that dtype with autocast off, so the output and the gradients come out in it, and
    the gradients reach fp32 parameters through the cast, as with autocast's own ``F.linear``.
    """
    dtype = autocast_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return mx_linear(x.to(dtype), weight.to(dtype), _cast(bias, dtype), scheme)
    x2d = x.reshape(-1, x.shape[-1])
    y = _MxLinearFunction.apply(x2d, weight, bias, scheme)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _MxMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scheme):
        ctx.scheme = scheme
        ctx.save_for_backward(a, b)
        aq = quantize_role(a, scheme, "act", -1, operand=0)
        bq = quantize_role(b, scheme, "act", -2, operand=1)
        y = gemm(aq, bq, scheme, ("act", "act"))
        return round_fresh(y, scheme)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        s = ctx.scheme
        if not s.quantize_backprop:
            return dy @ b.transpose(-1, -2), a.transpose(-1, -2) @ dy, None
        # dA = dY @ B^T contracts over B's columns; dB = A^T @ dY contracts over A's rows.
        da = gemm(
            quantize_role(dy, s, "grad_dgrad", -1, operand=0),
            quantize_role(b, s, "act_bp", -1, operand=1).transpose(-1, -2),
            s,
            ("grad_dgrad", "act_bp"),
        )
        db = gemm(
            quantize_role(a, s, "act_bp", -2, operand=0).transpose(-1, -2),
            quantize_role(dy, s, "grad_wgrad", -2, operand=1),
            s,
            ("act_bp", "grad_wgrad"),
        )
        return round_fresh(da, s), round_fresh(db, s), None


def mx_matmul(a: torch.Tensor, b: torch.Tensor, scheme: PrecisionScheme | None) -> torch.Tensor:
    """``a @ b`` for attention products: both operands are activations (role ``act`` forward,
    ``act_bp`` / ``grad_*`` backward), blocked along the contraction axis. ``None`` = plain."""
    if scheme is None:
        return a @ b
    dtype = autocast_dtype(a)
    if dtype is not None:  # as mx_linear: operands in the autocast dtype, products in it
        with torch.autocast(a.device.type, enabled=False):
            return _MxMatmulFunction.apply(a.to(dtype), b.to(dtype), scheme)
    return _MxMatmulFunction.apply(a, b, scheme)


class MxModule:
    """Mixin for modules with a run-time precision: ``mx_scheme`` and ``mx_enabled``."""

    mx_scheme: PrecisionScheme | None = None
    mx_enabled: bool = True
    # The roles this kind of module uses (what describe() reports).
    mx_roles: tuple[str, ...] = ("elementwise",)
    # {parameter name: (role that rounds it in the forward pass, axis of its blocks in the stored
    # tensor)}: what snap_parameters snaps and what the monitors measure.
    mx_param_roles: dict[str, tuple[str, int]] = {}

    def active_scheme(self) -> PrecisionScheme | None:
        """The scheme in force now, or ``None`` for full precision."""
        return self.mx_scheme if self.mx_enabled else None

    def forward_operand(self, name: str) -> torch.Tensor:
        """The tensor the forward pass multiplies by for parameter ``name``, before rounding
        (the parameter itself, or e.g. ``1 + w`` for a norm that scales by ``1 + w``)."""
        return getattr(self, name)

    def forward_parameter(self, name: str, scheme: PrecisionScheme) -> torch.Tensor:
        """The value parameter ``name`` takes in the forward pass under ``scheme`` (stored
        layout; straight-through gradient to the parameter)."""
        role, axis = self.mx_param_roles[name]
        return quantize_role(getattr(self, name), scheme, role, axis)


# The roles of a module computing GEMMs: the six operands, and its output and bias.
LINEAR_ROLES = (*GEMM_ROLES, "elementwise")


class MxLinearOutIn(MxModule):
    """Mixin for a linear stored as ``nn.Linear`` is (out, in), applied as ``x @ W^T + b``: the
    class's own forward in full precision, the MX GEMM otherwise."""

    mx_roles = LINEAR_ROLES
    mx_param_roles = {"weight": ("weight", -1), "bias": ("elementwise", -1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scheme = self.active_scheme()
        if scheme is None:
            return super().forward(x)
        return mx_linear(x, self.weight, getattr(self, "bias", None), scheme)


class MxLinear(MxLinearOutIn, nn.Linear):
    """``nn.Linear`` whose GEMMs are MX-emulated according to ``mx_scheme``."""


NORM_ROLES = ("norm_affine", "elementwise")


@contextlib.contextmanager
def substituted(module: nn.Module, values: dict[str, torch.Tensor | None]) -> Iterator[None]:
    """Inside the block ``module.<name>`` reads ``values[name]`` instead of the parameter (the
    Parameter objects, their gradients and optimizer state are untouched)."""
    saved = {name: module._parameters[name] for name in values}
    try:
        module._parameters.update(values)
        yield
    finally:
        module._parameters.update(saved)


class MxNorm(MxModule):
    """Mixin for a normalization times an affine weight γ (+ a bias β): the class's own
    forward (its eps, dtype casts and order of operations), run with γ/β replaced by their
    :meth:`forward_parameter` values (``norm_affine``, straight-through gradients) and its input
    and output rounded by ``elementwise``. ``mx_weight_offset`` is the ``offset`` of a norm that
    multiplies by ``offset + weight`` (measured by ``adapters.probe_weight_offset``; 0 for
    torch's norms)."""

    mx_roles = NORM_ROLES
    mx_param_roles = {"weight": ("norm_affine", -1), "bias": ("norm_affine", -1)}
    mx_weight_offset: float = 0.0

    def forward_operand(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if name == "weight" and self.mx_weight_offset:
            return value + self.mx_weight_offset
        return value

    def forward_parameter(self, name: str, scheme: PrecisionScheme) -> torch.Tensor:
        role, axis = self.mx_param_roles[name]
        q = quantize_role(self.forward_operand(name), scheme, role, axis)
        # q - offset is exact: q has few significant bits and lies near the offset.
        return q - self.mx_weight_offset if name == "weight" and self.mx_weight_offset else q

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scheme = self.active_scheme()
        if scheme is None:
            return super().forward(x, *args, **kwargs)
        with substituted(self, _forward_values(self, scheme)):
            y = super().forward(round_elementwise(x, scheme), *args, **kwargs)
        return round_elementwise(y, scheme)


def _forward_values(module: MxNorm, scheme: PrecisionScheme) -> dict[str, torch.Tensor]:
    """{name: its forward value} of each parameter of ``mx_param_roles`` that ``module`` holds.

    A function of its own, not a comprehension in ``forward``: where quantizing breaks the
    torch.compile graph (NVFP4 reads its tensor scale with ``.item()``), Dynamo then resumes
    ``forward`` after this call and compiles the norm; a graph break inside a comprehension
    or loop of ``forward`` makes it run the whole of ``forward`` eagerly instead."""
    return {
        name: module.forward_parameter(name, scheme)
        for name in module.mx_param_roles
        if isinstance(module._parameters.get(name), torch.Tensor)
    }


class MxLayerNorm(MxNorm, nn.LayerNorm):
    """``nn.LayerNorm`` with γ/β quantized by ``norm_affine`` and its input/output rounded by
    ``elementwise``."""


class MxRMSNorm(MxNorm, nn.RMSNorm):
    """``nn.RMSNorm`` with γ quantized by ``norm_affine`` and input/output rounded by
    ``elementwise``."""

    mx_param_roles = {"weight": ("norm_affine", -1)}


def role_quantizer(scheme: PrecisionScheme, role: str) -> tuple:
    """What rounds ``role`` under ``scheme``: equal tuples round identically."""
    if role in BACKWARD_ROLES and not scheme.quantize_backprop:
        return ("fp32",)
    fmt = getattr(scheme, role)
    if fmt == NVFP4:
        return (fmt, *nvfp4_settings(scheme, role))
    if is_mx(fmt):
        return fmt, scheme.block_size, scheme.scale_mode, scheme.rounding
    return (fmt,)


def snap_parameters(module: MxModule, before: PrecisionScheme, after: PrecisionScheme) -> None:
    """Overwrite each parameter of ``module`` whose forward rounding differs between the two
    schemes with the value the forward pass used under ``before``.

    A run adapts to the quantized weights it computes with (e.g. floor-saturated LayerNorm
    gamma), not to the latent fp32 ones, so switching to a finer format without snapping
    changes the network's function at once. With snapping the function is unchanged whenever
    ``before``'s grid is contained in ``after``'s (MX fp8/fp6/fp4 into bf16 or fp32).
    """
    for name, (role, _) in module.mx_param_roles.items():
        param = getattr(module, name, None)
        if param is None or role_quantizer(before, role) == role_quantizer(after, role):
            continue
        with torch.no_grad():
            if is_sharded(param):
                _snap_sharded(module, name, before)
            else:
                param.copy_(module.forward_parameter(name, before))


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _snap_sharded(module: MxModule, name: str, before: PrecisionScheme) -> None:
    """Snap a parameter sharded by FSDP2 (a ``DTensor`` outside forward): the forward value of
    the full tensor, of which each rank keeps its own shard.

    Gathered rather than quantized shard by shard: FSDP2 splits dim 0, which is the block axis
    of a 1-d gamma/beta/bias, at offsets that need not be multiples of the block size. The
    value is computed as FSDP2's forward computes it, with the unsharded tensor in place of
    the parameter, so every ``forward_parameter`` (e.g. a ``1 + w`` norm's) applies unchanged.
    """
    sharded = module._parameters[name]
    module._parameters[name] = nn.Parameter(sharded.full_tensor(), requires_grad=False)
    try:
        value = module.forward_parameter(name, before)
    finally:
        module._parameters[name] = sharded
    # Every rank holds the same full value: each takes its own shard, without communication.
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(value, sharded.device_mesh, sharded.placements, src_data_rank=None)
    sharded.to_local().copy_(mine.to_local())


class MxActivation(MxModule):
    """Mixin for activation modules: input and output rounded by ``elementwise``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scheme = self.active_scheme()
        if scheme is None:
            return super().forward(x)
        return round_elementwise(super().forward(round_elementwise(x, scheme)), scheme)


class MxGELU(MxActivation, nn.GELU):
    """``nn.GELU`` with elementwise-rounded input and output."""


class MxReLU(MxActivation, nn.ReLU):
    """``nn.ReLU`` with elementwise-rounded input and output."""


class MxSiLU(MxActivation, nn.SiLU):
    """``nn.SiLU`` with elementwise-rounded input and output."""


class MxMatmul(MxModule, nn.Module):
    """An attention product ``a @ b`` as a module, so that ``convert``/``set_scheme`` reach it.

    Unconverted (``mx_scheme`` None) it is a plain matmul; models that want MX attention
    products (``mxprobe.models.llm``) hold one per product.
    """

    mx_roles = ("act", "act_bp", "grad_wgrad", "grad_dgrad", "elementwise")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mx_matmul(a, b, self.active_scheme())


# The torch class each MX class replaces; convert() swaps exactly these types (not subclasses,
# whose own forward would be lost).
MX_CLASS_OF: dict[type, type] = {
    nn.Linear: MxLinear,
    nn.LayerNorm: MxLayerNorm,
    nn.RMSNorm: MxRMSNorm,
    nn.GELU: MxGELU,
    nn.ReLU: MxReLU,
    nn.SiLU: MxSiLU,
}

"""What ``convert`` emulates: a registry of adapters, one per kind of computation.

A module is converted by what it computes, not by its exact class:

- ``linear``: a GEMM ``y = x W^T + b`` (all six operands of docs/numerics.md). ``weight_layout``
  says how ``W`` is stored: ``"out_in"`` (``nn.Linear``) or ``"in_out"`` (transformers'
  ``Conv1D``, which computes ``x @ W + b``).
- ``norm``: a normalization times an affine weight γ, optionally plus a bias β
  (:class:`mxprobe.modules.MxNorm`, the mechanism of torch's own norms too). The library's
  own ``forward`` runs with γ and β replaced by the values ``norm_affine`` gives them, so its
  eps, dtype casts and order of operations stay exactly its own (``full_precision`` is bit for
  bit the library's). A norm that multiplies by ``offset + w`` (Gemma, litgpt's
  ``add_unit_offset``) has its *effective* multiplier ``offset + w`` quantized, since that is
  the operand of the product (the one clustered near 1 whose block max saturates); snapping
  and ``NormAffineMonitor`` use the same effective value. The offset is measured on each
  module at conversion (two probe forwards), so a norm that is not a normalization times
  ``offset + w`` is refused instead of being emulated wrongly.
- ``activation``: an elementwise nonlinearity, input and output rounded by ``elementwise``.
- ``experts``: a mixture-of-experts layer in transformers' layout (3-D expert weights behind its
  experts interface), every expert GEMM emulated per expert (:mod:`mxprobe.experts`).
- ``router``: a module computing ``F.linear(x, self.weight[, self.bias])`` in its own forward
  (an MoE router): that GEMM emulated (:mod:`mxprobe.products`); **full precision unless an
  override names it**, as MX recipes keep routers in high precision.
- ``attention``: a module computing QKᵀ and PV itself (``matmul``/``bmm``/``baddbmm`` or
  ``F.scaled_dot_product_attention``): given ``mx_qk``/``mx_pv`` products, its own forward runs
  with those products MX-emulated (:mod:`mxprobe.products`).

A class registered as ``linear`` or ``norm`` is checked on each module at conversion with probe
forwards against its own forward, and refused with the reason when it does not compute what
its kind says (``convert`` then leaves the model unchanged).

Built in: ``nn.Linear`` (and subclasses that keep its ``forward``), ``nn.LayerNorm``,
``nn.RMSNorm``, torch's elementwise activation modules (``nn.GELU``, ``nn.ReLU``, ``nn.SiLU``,
``nn.Tanh``, ``nn.Sigmoid``...) and their subclasses; transformers' ``Conv1D``; every
``*RMSNorm`` / ``*LayerNorm`` class of transformers, timm and litgpt; the activation classes of
``transformers.activations`` and ``timm.layers.activations`` and Bloom's ``BloomGelu``;
transformers' experts modules and ``*Router`` classes; Bloom's and litgpt's attention. None of those
libraries is imported: classes are matched by their qualified names.

Register your own class in one call, e.g.
``mxprobe.register_adapter(MyNorm, "norm")`` or ``register_adapter("mylib.layers.Dense",
"linear", weight_layout="in_out")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mxprobe.experts import MxExpertsAdapter, has_experts_layout, is_hf_experts
from mxprobe.modules import (
    LINEAR_ROLES,
    MX_CLASS_OF,
    MxActivation,
    MxLinearOutIn,
    MxModule,
    MxNorm,
    mx_linear,
    substituted,
)
from mxprobe.products import run_scoped
from mxprobe.scheme import PrecisionScheme

KINDS = ("linear", "norm", "activation", "experts", "router", "attention")
WEIGHT_LAYOUTS = ("out_in", "in_out")
# Libraries whose norm and activation classes are recognised by name (never imported here).
_LIBRARIES = ("transformers", "timm", "litgpt")
_NORM_NAME = re.compile(r"(RMS|Layer)Norm$")
_ACTIVATION_MODULES = ("transformers.activations", "timm.layers.activations")
_ROUTER_NAME = re.compile(r"Router$")
# torch's elementwise activation modules beyond the three with their own twins in modules.py.
_TORCH_ACTIVATIONS = (
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
)  # fmt: skip


@dataclass(frozen=True)
class Adapter:
    """How one class is emulated: ``kind`` (``linear``, ``norm``, ``activation``) and, for a
    linear, how its weight is stored."""

    kind: str
    weight_layout: str = "out_in"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; expected one of {KINDS}")
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(
                f"unknown weight_layout {self.weight_layout!r}; expected one of {WEIGHT_LAYOUTS}"
            )


_REGISTRY: dict[type | str, Adapter] = {}


def register_adapter(cls: type | str, kind: str, *, weight_layout: str = "out_in") -> None:
    """Make ``convert`` emulate instances of ``cls`` (a class, or its dotted qualified name such
    as ``"mylib.layers.MyNorm"`` so that the library need not be imported) and its subclasses.

    ``kind`` is ``"linear"`` (``weight`` [+ ``bias``] parameters, ``weight_layout`` ``"out_in"``
    as ``nn.Linear`` or ``"in_out"``), ``"norm"`` (a ``weight`` γ [+ ``bias`` β] used as
    ``normalize(x) * (offset + weight) + bias``), ``"activation"`` (elementwise), ``"experts"``,
    ``"router"`` or ``"attention"`` (see the module docstring). ``convert`` checks each module
    of a registered class against its kind and refuses one that does not fit, with the reason.
    A linear subclass that overrides ``forward`` is not converted (its own computation would be
    lost); register the subclass itself to have it replaced by the MX GEMM.
    """
    if not isinstance(cls, (type, str)):
        raise TypeError(f"expected a class or a dotted class name, got {cls!r}")
    _REGISTRY[cls] = Adapter(kind, weight_layout)
    _TWINS.clear()


def unregister_adapter(cls: type | str) -> None:
    """Undo ``register_adapter(cls, ...)``: modules of ``cls`` are converted as before it (a
    built-in class goes back to being unknown). Raises ``KeyError`` if ``cls`` is not registered.
    Modules already converted keep their MX class."""
    if cls not in _REGISTRY:
        raise KeyError(f"{cls!r} is not registered")
    del _REGISTRY[cls]
    _TWINS.clear()


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered(cls: type) -> Adapter | None:
    return _REGISTRY.get(cls) or _REGISTRY.get(_qualified(cls))


def adapter_for(module: nn.Module) -> tuple[Adapter | None, str]:
    """(the adapter that emulates ``module``, or ``None`` with the reason it is left alone)."""
    cls = type(module)
    for base in cls.__mro__:
        adapter = _registered(base)
        if adapter is None:
            continue
        if adapter.kind == "linear" and base is not cls and cls.forward is not base.forward:
            return None, (
                f"subclass of {base.__name__} with its own forward: register it with "
                f"mxprobe.register_adapter({cls.__name__}, 'linear') to replace that forward"
            )
        return adapter, ""
    library = cls.__module__.split(".")[0]
    if library in _LIBRARIES and _NORM_NAME.search(cls.__name__):
        return Adapter("norm"), ""
    if is_hf_experts(module):
        return Adapter("experts"), ""
    if library == "transformers" and _ROUTER_NAME.search(cls.__name__):
        return Adapter("router"), ""
    if cls.__module__.startswith(_ACTIVATION_MODULES):
        return Adapter("activation"), ""
    return None, _unsupported_reason(module)


def _unsupported_reason(module: nn.Module) -> str:
    own = [n for n, p in module._parameters.items() if p is not None]
    if own == ["sinks"]:
        return "attention sink logits (added to the scores, not a GEMM operand)"
    if own and next(module.children(), None) is not None:
        return f"its own forward uses its parameters {own} directly (not emulated)"
    if isinstance(module, nn.Embedding):
        return "embedding lookup (not a GEMM; its table stays full precision)"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "convolution (not emulated)"
    name = type(module).__name__
    return (
        f"unknown class {_qualified(type(module))}: register it with "
        f"mxprobe.register_adapter({name}, 'linear' | 'norm' | 'activation')"
    )


class MxLinearInOut(MxModule):
    """Mixin for a linear whose weight is stored (in, out) and applied as ``x @ W + b``."""

    mx_roles = LINEAR_ROLES
    # Blocks of the forward weight run along in_features: axis 0 of the stored (in, out) tensor.
    mx_param_roles = {"weight": ("weight", 0), "bias": ("elementwise", -1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scheme = self.active_scheme()
        if scheme is None:
            return super().forward(x)
        return mx_linear(x, self.weight.t(), self.bias, scheme)


class MxRouterAdapter(MxModule):
    """Mixin for a module whose own forward computes ``F.linear(x, self.weight[, self.bias])``
    among other things (an MoE router): that GEMM MX-emulated, the rest its own code. Full
    precision unless an override names it (``mx_full_precision_by_default``)."""

    mx_roles = LINEAR_ROLES
    mx_param_roles = {"weight": ("weight", -1), "bias": ("elementwise", -1)}
    mx_full_precision_by_default = True

    def forward(self, *args, **kwargs):
        return run_scoped(self, super().forward, *args, **kwargs)


class MxAttentionAdapter(MxModule):
    """Mixin for an attention module computing its products itself: its own forward, with QKᵀ and
    PV through its ``mx_qk``/``mx_pv`` children (``convert`` adds them)."""

    mx_roles = ()

    def forward(self, *args, **kwargs):
        return run_scoped(self, super().forward, *args, **kwargs)


_MIXINS = {
    ("linear", "out_in"): MxLinearOutIn,
    ("linear", "in_out"): MxLinearInOut,
    ("norm", "out_in"): MxNorm,
    ("activation", "out_in"): MxActivation,
    ("experts", "out_in"): MxExpertsAdapter,
    ("router", "out_in"): MxRouterAdapter,
    ("attention", "out_in"): MxAttentionAdapter,
}
_TWINS: dict[type, type] = {}


def twin_class(cls: type, adapter: Adapter) -> type:
    """The MX class ``convert`` gives instances of ``cls`` (``MxLinear`` for ``nn.Linear``...;
    a generated ``Mx<Name>`` subclass of ``cls`` for any other class)."""
    if cls in MX_CLASS_OF:
        return MX_CLASS_OF[cls]
    if cls not in _TWINS:
        mixin = _MIXINS[
            (adapter.kind, adapter.weight_layout if adapter.kind == "linear" else "out_in")
        ]
        # Named after the class, plus its library where that would repeat a torch twin's name
        # (timm's LayerNorm becomes MxLayerNorm[timm], not a second MxLayerNorm).
        name = f"Mx{cls.__name__}"
        if name in {twin.__name__ for twin in MX_CLASS_OF.values()}:
            name += f"[{cls.__module__.split('.')[0]}]"
        _TWINS[cls] = type(name, (mixin, cls), {"__module__": cls.__module__})
    return _TWINS[cls]


def probe_weight_offset(module: nn.Module) -> float:
    """The ``offset`` with which the norm ``module`` multiplies by ``offset + weight`` (0 or 1),
    measured with two probe forwards; raises ``ValueError`` when its output is not of that form.

    With β zeroed and γ set to constants c, a norm computing ``n(x) * (offset + γ)`` gives
    f(c) = (offset + c) n(x); doubling ``offset + c`` doubles the output exactly in any float
    format, so the test is exact.
    """
    weight = module._parameters.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.is_meta:
        return 0.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, *weight.shape), generator=gen).to(weight.device, weight.dtype)
    zero_bias = {}
    if isinstance(module._parameters.get("bias"), torch.Tensor):
        zero_bias["bias"] = torch.zeros_like(module._parameters["bias"])
    forward = type(module).forward

    def output(c: float) -> torch.Tensor:
        with (
            torch.no_grad(),
            substituted(module, {"weight": torch.full_like(weight, c), **zero_bias}),
        ):
            return forward(module, x)

    for offset in (0.0, 1.0):
        one, two = output(1.0 - offset), output(2.0 - offset)
        if torch.equal(two, 2 * one) and bool(one.ne(0).any()) and not output(-offset).any():
            return offset
    raise ValueError(
        f"{_qualified(type(module))} is registered as a norm, but its output is not "
        "normalize(x) * weight (+ bias) or normalize(x) * (1 + weight): convert cannot emulate "
        "it; register it as another kind or leave it out"
    )


def probe_linear(module: nn.Module, adapter: Adapter) -> None:
    """Check that ``module``, registered as a linear, computes ``x W^T + b`` (``x W + b`` for
    ``in_out``): its own forward against the MX GEMM in fp32 on a probe input. Raises
    ``ValueError`` naming the class and what does not fit."""
    name = _qualified(type(module))
    weight = module._parameters.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{name} is registered as a linear but has no 2-D 'weight' parameter; register it "
            f"as one of {KINDS} that fits, or leave it out"
        )
    if weight.is_meta:
        return
    w = weight if adapter.weight_layout == "out_in" else weight.t()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, w.shape[1]), generator=gen).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            own = type(module).forward(module, x)
            mx = mx_linear(x, w, getattr(module, "bias", None), PrecisionScheme())
        fits = isinstance(own, torch.Tensor) and own.shape == mx.shape
        fits = fits and torch.allclose(own, mx, rtol=1e-4, atol=1e-5)
        why = "its forward on one input tensor is not x @ W^T + b"
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means it does not fit
        fits, why = False, f"its forward fails on one input tensor ({type(exc).__name__}: {exc})"
    if not fits:
        raise ValueError(
            f"{name} is registered as a linear, but {why}; convert cannot emulate it as one "
            f"(kinds: {KINDS}); the model is unchanged"
        )


def check_fits(module: nn.Module, adapter: Adapter) -> float:
    """Check ``module`` against the kind it is converted as; return a norm's weight offset.

    Raises ``ValueError`` naming the class and what does not fit its kind."""
    name = _qualified(type(module))
    if adapter.kind == "norm":
        return probe_weight_offset(module) if type(module) not in MX_CLASS_OF else 0.0
    if adapter.kind == "linear" and type(module) not in MX_CLASS_OF:
        probe_linear(module, adapter)
    elif adapter.kind == "experts" and not has_experts_layout(module):
        raise ValueError(
            f"{name} is registered as experts, but it lacks transformers' experts layout "
            "(3-D down_proj, has_gate/has_bias/is_transposed/num_experts); convert cannot "
            "emulate it; the model is unchanged"
        )
    elif adapter.kind == "router":
        weight = module._parameters.get("weight")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"{name} is registered as a router but has no 2-D 'weight' parameter; the "
                "model is unchanged"
            )
    return 0.0


def register_builtins() -> None:
    for cls in MX_CLASS_OF:
        kind = (
            "linear"
            if cls is nn.Linear
            else "norm"
            if cls in (nn.LayerNorm, nn.RMSNorm)
            else "activation"
        )
        register_adapter(cls, kind)
    for cls in _TORCH_ACTIVATIONS:
        register_adapter(cls, "activation")
    register_adapter("transformers.pytorch_utils.Conv1D", "linear", weight_layout="in_out")
    register_adapter("transformers.models.bloom.modeling_bloom.BloomGelu", "activation")
    register_adapter("transformers.models.bloom.modeling_bloom.BloomAttention", "attention")
    # Calls F.scaled_dot_product_attention in its own code (checked with litgpt 0.5.13).
    register_adapter("litgpt.model.CausalSelfAttention", "attention")


register_builtins()

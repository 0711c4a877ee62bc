"""Turn any PyTorch model into an MX-emulated one in place, and change its precision at run time.

- ``convert(model, scheme, overrides)`` gives every module that computes a GEMM, a norm or an
  activation its MX twin class, by what it computes (the adapter registry of
  :mod:`mxprobe.adapters`: torch classes and their subclasses, transformers' ``Conv1D`` and
  ``*RMSNorm``, timm and litgpt norms, your own registered classes). The module objects and
  their Parameters stay the same, so ``state_dict`` keys, optimizer state and hooks are
  untouched. It warns once, naming every parameter-holding or activation-like module it left
  in full precision and why, and the MoE routers it keeps in full precision by default. All or
  nothing: when it raises, the model is as it was. Converting an already converted model is the
  same as ``set_scheme`` (idempotent). docs/models.md says how each kind is emulated.
- ``set_scheme(model, scheme, overrides)`` changes the precision of every MX module: an
  attribute change, nothing is allocated.
- ``amend_scheme(model, change, modules, snap)`` amends the current scheme of some modules.
- ``full_precision(model)`` turns quantization off inside a ``with`` block (shadow passes).
- ``describe(model)`` tabulates the effective format of every role of every MX module, every
  parameter-holding module left in full precision, and the share of parameters emulated.

Never silent: an override glob that matches no MX module, or a scheme item naming a role no
matched module has (``norm=bf16`` on a model without norms), raises ``ValueError``.

Modules whose ``forward`` torch never calls are not emulated: ``nn.MultiheadAttention`` reads its
projection weights directly, so its projections stay in full precision (the warning says so).
``nn.TransformerEncoderLayer``'s fused inference fast path is switched off so that its linears
and norms are emulated in eval mode too. Attention products are emulated in transformers models,
in attention built from ``nn.Linear`` + ``MxMatmul`` (as ``mxprobe.models.llm``) and in classes
registered as ``"attention"``; other ``*Attention`` modules are named as not emulated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from mxprobe import hf_attention
from mxprobe.adapters import adapter_for, check_fits, twin_class
from mxprobe.formats import is_mx
from mxprobe.modules import MxMatmul, MxModule, role_quantizer, snap_parameters
from mxprobe.scheme import (
    ROLES,
    PrecisionScheme,
    inert_settings_of,
    matches_glob,
    named_roles,
    parse_scheme,
    resolve_scheme,
    validate_overrides,
)

Overrides = Mapping[str, "str | PrecisionScheme"] | None


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with the ``_orig_mod`` segment that ``torch.compile``'s wrapper
    adds removed, so names, globs and metrics are the same compiled or not."""
    for name, module in model.named_modules():
        yield ".".join(part for part in name.split(".") if part != "_orig_mod"), module


def _mx_modules(model: nn.Module) -> Iterator[tuple[str, MxModule]]:
    for name, module in named_modules(model):
        if isinstance(module, MxModule):
            yield name, module


def _inside_attention(name: str, attention_prefixes: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in attention_prefixes)


def _adapter(name: str, module: nn.Module, attention: list[str]):
    """``adapter_for(module)``, except inside ``nn.MultiheadAttention`` (never called)."""
    if isinstance(module, nn.MultiheadAttention) or _inside_attention(name, attention):
        return None, (
            "nn.MultiheadAttention reads its projection weights directly; those projections "
            "stay full precision (build attention from nn.Linear)"
        )
    return adapter_for(module)


def _attention_names(model: nn.Module) -> list[str]:
    return [n for n, m in named_modules(model) if isinstance(m, nn.MultiheadAttention)]


_ATTENTION_LEFT = (
    "attention products (QKᵀ, PV) run in full precision: mxprobe emulates them in "
    "transformers models and in attention built with mxprobe.MxMatmul"
)


def unemulated_attention(model: nn.Module) -> list[str]:
    """Names of the attention modules whose products are not MX-emulated (no ``MxMatmul``)."""
    return [
        name
        for name, m in named_modules(model)
        if hf_attention.named_like_attention(m)
        and not any(isinstance(c, MxMatmul) for c in m.modules())
    ]


def _holds_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


_ROUTERS_KEPT = (
    "MoE routers: kept in full precision by default, as MX recipes do; an override naming them "
    "(e.g. {{'*.{}': 'mxfp8_e4m3'}}) emulates their GEMM"
)
# Parameter-free classes that look like activations: named when left in full precision.
_ACTIVATION_NAME = re.compile(r"Gelu|GELU|Activation|Tanh|Sigmoid|Swish|ReLU|Relu|SiLU|Silu")
# What convert may set on a module: restored when a conversion fails halfway.
_CONVERT_ATTRS = ("mx_scheme", "mx_enabled", "mx_weight_offset", "activation_relu_or_gelu")


def convert(
    model: nn.Module, scheme: str | PrecisionScheme, overrides: Overrides = None
) -> nn.Module:
    """Make ``model`` MX-emulated in place under ``scheme`` (+ per-layer ``overrides``).

    Returns the same model object. Warns (``UserWarning``) naming every parameter-holding or
    activation-like module left in full precision and why, and the MoE routers kept in full
    precision. All or nothing: when it raises (``ValueError`` for a bad scheme, an override
    that matches no MX module, a module that does not fit the kind its class is registered
    as), the model is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    base = parse_scheme(scheme)
    validate_overrides(overrides)
    snapshot = _snapshot(model)
    try:
        left = _convert_modules(model)
        _apply(model, base, overrides)
    except BaseException:
        _restore(model, snapshot)
        raise
    routers = [n for n, m in _mx_modules(model) if _router_kept(n, m, overrides)]
    if left or routers:
        warnings.warn(_left_message(left, routers), UserWarning, stacklevel=2)
    return model


def _convert_modules(model: nn.Module) -> dict[str, str]:
    """Give every module its MX class; {name: reason} of those left in full precision."""
    attention = _attention_names(model)
    left: dict[str, str] = {}
    for name, module in list(named_modules(model)):
        if isinstance(module, nn.TransformerEncoderLayer):
            # Its eval/no_grad fast path reads linear and norm weights directly, skipping our
            # forwards; the fast path is only taken when this flag is set.
            module.activation_relu_or_gelu = 0
        if isinstance(module, MxModule):
            continue
        adapter, reason = _adapter(name, module, attention)
        if adapter is None:
            if _holds_parameters(module) or _activation_like(module):
                left[name] = reason
            continue
        offset = check_fits(module, adapter)
        module.__class__ = twin_class(type(module), adapter)
        if offset:
            module.mx_weight_offset = offset
        if adapter.kind == "attention" and not isinstance(getattr(module, "mx_qk", None), MxMatmul):
            module.mx_qk = MxMatmul()
            module.mx_pv = MxMatmul()
    for hf_model in _transformers_models(model):
        hf_attention.install(hf_model)
    left.update(dict.fromkeys(unemulated_attention(model), _ATTENTION_LEFT))
    return left


def _transformers_models(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers models in ``model`` (itself, or inside a user's wrapper such
    as a LightningModule)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in named_modules(model):
        inside = any(name.startswith(outer + ".") or not outer for outer, _ in found)
        if not inside and hf_attention.is_transformers_model(module):
            found.append((name, module))
    return [module for _, module in found]


def _activation_like(module: nn.Module) -> bool:
    return next(module.children(), None) is None and bool(
        _ACTIVATION_NAME.search(type(module).__name__)
    )


def _snapshot(model: nn.Module) -> tuple[list, list]:
    modules = [
        (
            m,
            m.__class__,
            {k: m.__dict__[k] for k in _CONVERT_ATTRS if k in m.__dict__},
            dict(m._modules),
        )
        for m in model.modules()
    ]
    attention = [(m, m.config._attn_implementation) for m in _transformers_models(model)]
    return modules, attention


def _restore(model: nn.Module, snapshot: tuple[list, list]) -> None:
    modules, attention = snapshot
    for module, cls, attrs, children in modules:
        module.__class__ = cls
        for key in _CONVERT_ATTRS:
            module.__dict__.pop(key, None)
        module.__dict__.update(attrs)
        module._modules.clear()
        module._modules.update(children)
    for hf_model, implementation in attention:
        if hf_model.config._attn_implementation != implementation:
            hf_model.set_attn_implementation(implementation)


def _left_message(left: dict[str, str], routers: list[str]) -> str:
    by_reason: dict[str, list[str]] = {}
    for name, reason in left.items():
        by_reason.setdefault(reason, []).append(name or "<root>")
    if routers:
        by_reason[_ROUTERS_KEPT.format(routers[0].rsplit(".", 1)[-1])] = routers
    count = len(left) + len(routers)
    lines = [f"mxprobe.convert left {count} module(s) in full precision:"]
    for reason, names in by_reason.items():
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        lines.append(f"  - {shown}: {reason}")
    return "\n".join(lines)


def _router_kept(name: str, module: MxModule, overrides: Overrides) -> bool:
    """A router left at its default (full precision): no override names it."""
    return getattr(module, "mx_full_precision_by_default", False) and not any(
        matches_glob(name, pattern) for pattern in overrides or {}
    )


def _apply(model: nn.Module, base: PrecisionScheme, overrides: Overrides) -> int:
    modules = list(_mx_modules(model))
    for pattern, value in (overrides or {}).items():
        if not any(matches_glob(name, pattern) for name, _ in modules):
            raise ValueError(
                f"override {pattern!r} matches no MX module (names: "
                f"{[n for n, _ in modules][:8]}); fix the glob or drop the override"
            )
        # The base was checked by parse_scheme; the settings an override adds are checked here.
        made = value if isinstance(value, PrecisionScheme) else base.amend(value)
        inert = inert_settings_of(value, made)
        if inert:
            raise ValueError(f"override {pattern!r} = {str(value)!r}: {'; '.join(inert.values())}")
    for name, module in modules:
        # A router follows the base scheme only when an override names it. Kept, it runs its own
        # code unscoped (None), so its float copies of a bf16 weight (DeepSeek-V3) are not refused.
        kept = _router_kept(name, module, overrides)
        module.mx_scheme = None if kept else resolve_scheme(name, base, overrides)
    return len(modules)


def _check_roles(scheme: str | PrecisionScheme, modules: list[tuple[str, MxModule]], where: str):
    """Raise when ``scheme`` names, item by item, a role that none of ``modules`` has."""
    present = {role for _, module in modules for role in module.mx_roles}
    missing = sorted(named_roles(scheme) - present)
    if missing:
        kinds = sorted({type(m).__name__ for _, m in modules})
        raise ValueError(
            f"scheme {str(scheme)!r} sets {', '.join(missing)}, but no MX module {where} has "
            f"that role (module types: {kinds}); a norm role needs a converted norm "
            "(register its class with mxprobe.register_adapter(cls, 'norm'))"
        )


def set_scheme(
    model: nn.Module, scheme: str | PrecisionScheme, overrides: Overrides = None
) -> nn.Module:
    """Change the precision of every MX module of ``model`` (no parameter is touched).

    A partial string such as ``"norm=bf16"`` amends nothing here: it is a full scheme with the
    other roles fp32. To amend each module's current scheme use ``amend_scheme``.
    """
    base = parse_scheme(scheme)
    validate_overrides(overrides)
    modules = list(_mx_modules(model))
    if not modules:
        raise ValueError("model has no MX modules; call mxprobe.convert(model, scheme) first")
    _check_roles(scheme, modules, "of the model")
    _apply(model, base, overrides)
    return model


def amend_scheme(
    model: nn.Module, change: str, modules: str = "*", snap: bool = False
) -> dict[str, tuple[PrecisionScheme, PrecisionScheme]]:
    """Amend the current scheme of every MX module whose name matches the glob ``modules`` with
    the partial string ``change`` (e.g. ``"norm=bf16"``).

    Returns {name: (before, after)} of the modules whose effective rounding of some role they
    have actually changed (a module already in that state, or one without the role, is not
    listed). ``snap=True`` first overwrites every parameter whose forward rounding changes with
    the value the old scheme's forward used (``mxprobe.modules.snap_parameters``), so a switch
    to a finer format leaves the network's output unchanged instead of jolting it.

    Raises:
        ValueError: ``modules`` matches no MX module, or ``change`` names a role none of the
            matched modules has.
    """
    matched = check_scheme_change(model, change, modules, snap)
    changed = {}
    for name, module in matched:
        before = module.mx_scheme or PrecisionScheme()  # None means full precision = fp32
        after = before.amend(change)
        if snap:
            snap_parameters(module, before, after)
        module.mx_scheme = after
        if any(role_quantizer(before, r) != role_quantizer(after, r) for r in module.mx_roles):
            changed[name] = (before, after)
    return changed


def check_scheme_change(
    model: nn.Module, change: str, modules: str = "*", snap: bool = False
) -> list[tuple[str, MxModule]]:
    """The MX modules ``amend_scheme(model, change, modules, snap)`` would amend; raises
    ``ValueError`` when ``modules`` matches none, ``change`` names a role none of them has, or
    ``snap`` would snap a parameter rounded stochastically (what rules check at setup, before
    a run relies on them)."""
    PrecisionScheme().amend(change)  # a malformed change fails here, naming the bad item
    matched = [(n, m) for n, m in _mx_modules(model) if matches_glob(n, modules)]
    if not matched:
        names = module_names(model)[:10] or "none (call mxprobe.convert first)"
        raise ValueError(f"no MX module matches {modules!r}; MX modules: {names}")
    _check_roles(change, matched, f"matching {modules!r}")
    _check_settings_apply(change, matched)
    if snap:
        stochastic = [n for n, m in matched if _snaps_stochastic(m, change)]
        if stochastic:
            raise ValueError(
                f"snap=True under stochastic rounding ({stochastic[:4]}): the forward's values "
                "were drawn with noise that cannot be redrawn, so snapping would set other "
                "values than the forward used; switch without snap, or snap from rounding=even"
            )
    return matched


def _check_settings_apply(change: str, modules: list[tuple[str, MxModule]]) -> None:
    """Raise when a block/scale/rounding setting that ``change`` sets would be used by no role
    of any of ``modules`` once amended (e.g. ``nvgrad=stochastic`` on MX-only modules)."""
    inert = None
    for _, module in modules:
        found = inert_settings_of(change, (module.mx_scheme or PrecisionScheme()).amend(change))
        inert = found if inert is None else {k: v for k, v in inert.items() if k in found}
    if inert:
        raise ValueError(f"{'; '.join(inert.values())} in any module it amends ({change!r})")


def _snaps_stochastic(module: MxModule, change: str) -> bool:
    before = module.mx_scheme or PrecisionScheme()
    after = before.amend(change)
    # NVFP4 parameter roles round to nearest-even (only its gradient roles may be stochastic).
    return before.rounding == "stochastic" and any(
        is_mx(getattr(before, role)) and role_quantizer(before, role) != role_quantizer(after, role)
        for role, _ in module.mx_param_roles.values()
    )


def module_names(model: nn.Module) -> list[str]:
    """Qualified names of the MX modules of ``model``."""
    return [name for name, _ in _mx_modules(model)]


def schemes_of(model: nn.Module) -> dict[str, PrecisionScheme | None]:
    """{qualified name: current scheme} of every MX module."""
    return {name: module.mx_scheme for name, module in _mx_modules(model)}


def restore_schemes(model: nn.Module, schemes: Mapping[str, PrecisionScheme | None]) -> None:
    """Put back schemes taken with ``schemes_of`` (e.g. from a checkpoint)."""
    modules = dict(_mx_modules(model))
    missing = [n for n in schemes if n not in modules]
    if missing:
        raise ValueError(f"checkpoint names MX modules this model lacks: {missing[:5]}")
    for name, scheme in schemes.items():
        modules[name].mx_scheme = scheme


@contextlib.contextmanager
def full_precision(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every MX module of ``model`` computes in full precision."""
    saved = [(m, m.mx_enabled) for _, m in _mx_modules(model)]
    for m, _ in saved:
        m.mx_enabled = False
    try:
        yield model
    finally:
        for m, enabled in saved:
            m.mx_enabled = enabled


@dataclass
class Description:
    """Rows of (module name, module type, {role: format}) for the MX modules, (name, type,
    reason) for the parameter-holding modules left in full precision, and the share of the
    model's parameters (elements, tied ones counted once) held by MX modules."""

    rows: list[tuple[str, str, dict[str, str]]]
    left: list[tuple[str, str, str]]
    emulated_parameters: int
    total_parameters: int
    attention_left: list[str]
    routers_kept: list[str] = dataclasses.field(default_factory=list)

    @property
    def emulated_share(self) -> float:
        return self.emulated_parameters / self.total_parameters if self.total_parameters else 1.0

    def __str__(self) -> str:
        header = ("module", "type", *ROLES, "block", "scale", "round", "backprop")
        lines = [header]
        for name, kind, roles in self.rows:
            lines.append((name or "<root>", kind, *(roles[r] for r in header[2:])))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        text = [
            "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        ]
        if self.attention_left:
            text.append(f"attention products in full precision: {', '.join(self.attention_left)}")
        if self.routers_kept:
            names = ", ".join(self.routers_kept)
            text.append(
                f"MoE routers in full precision (the default; an override emulates): {names}"
            )
        if self.left:
            text.append("left in full precision:")
            text += [f"  {name or '<root>'} ({kind}): {why}" for name, kind, why in self.left]
        text.append(
            f"parameters held by MX modules: {self.emulated_parameters} of "
            f"{self.total_parameters} ({100 * self.emulated_share:.1f} %)"
        )
        return "\n".join(text)


def _effective(module: MxModule, role: str) -> str:
    if role not in module.mx_roles:
        return "-"
    return role_quantizer(module.active_scheme() or PrecisionScheme(), role)[0]


def describe(model: nn.Module) -> Description:
    """The effective format of every role of every MX module (``fp32`` when switched off or
    when backprop is not quantized, ``-`` for a role the module does not have), every
    parameter-holding module left in full precision with the reason, and the share of
    parameters held by MX modules."""
    rows, left = [], []
    attention = _attention_names(model)
    emulated: dict[int, int] = {}
    every: dict[int, int] = {}
    for name, module in named_modules(model):
        params = [p for p in module._parameters.values() if p is not None]
        every.update((id(p), p.numel()) for p in params)
        if not isinstance(module, MxModule):
            if params or _activation_like(module):
                _, reason = _adapter(name, module, attention)
                left.append((name, type(module).__name__, reason or "not converted yet"))
            continue
        emulated.update((id(p), p.numel()) for p in params)
        scheme = module.active_scheme() or PrecisionScheme()
        roles = {r: _effective(module, r) for r in ROLES}
        roles.update(
            block=str(scheme.block_size),
            scale=scheme.scale_mode,
            round=scheme.rounding,
            backprop=str(scheme.quantize_backprop).lower(),
        )
        rows.append((name, type(module).__name__, roles))
    routers = [
        name
        for name, m in _mx_modules(model)
        if getattr(m, "mx_full_precision_by_default", False)
        and (m.mx_scheme or PrecisionScheme()) == PrecisionScheme()
    ]
    return Description(
        rows,
        left,
        sum(emulated.values()),
        sum(every.values()),
        unemulated_attention(model),
        routers,
    )

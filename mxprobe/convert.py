"""Turn any PyTorch model into an MX-emulated one in place, and change its precision at run time.

- ``convert(model, scheme, overrides)`` swaps the class of every ``nn.Linear``, ``nn.LayerNorm``,
  ``nn.RMSNorm``, ``nn.GELU``, ``nn.ReLU`` and ``nn.SiLU`` (exact types, not subclasses) to its
  MX twin. The module objects and their Parameters stay the same, so ``state_dict`` keys,
  optimizer state and hooks are untouched. Converting an already converted model is the same as
  ``set_scheme`` (idempotent).
- ``set_scheme(model, scheme, overrides)`` changes the precision of every MX module: an attribute
  change, nothing is allocated. On a model with no MX module it raises ``ValueError``.
- ``full_precision(model)`` turns quantization off inside a ``with`` block (shadow passes).
- ``describe(model)`` tabulates the effective format of every role of every MX module.

Modules whose ``forward`` torch never calls are not emulated: ``nn.MultiheadAttention`` reads its
projection weights directly, so its projections stay in full precision (a warning says so).
``nn.TransformerEncoderLayer``'s fused inference fast path is switched off so that its linears
and norms are emulated in eval mode too.
Build attention from ``nn.Linear`` + ``MxMatmul`` (as ``mxprobe.models.llm`` does) to emulate it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from mxprobe.modules import MX_CLASS_OF, MxModule, snap_parameters
from mxprobe.scheme import (
    BACKWARD_ROLES,
    ROLES,
    PrecisionScheme,
    parse_scheme,
    resolve_scheme,
    validate_overrides,
)

Overrides = Mapping[str, "str | PrecisionScheme"] | None


def _mx_modules(model: nn.Module) -> Iterator[tuple[str, MxModule]]:
    for name, module in model.named_modules():
        if isinstance(module, MxModule):
            yield name, module


def _inside_attention(name: str, attention_prefixes: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in attention_prefixes)


def convert(
    model: nn.Module, scheme: str | PrecisionScheme, overrides: Overrides = None
) -> nn.Module:
    """Make ``model`` MX-emulated in place under ``scheme`` (+ per-layer ``overrides``).

    Returns the same model object. Raises ``ValueError`` for a bad scheme or override.
    """
    base = parse_scheme(scheme)
    validate_overrides(overrides)
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if attention:
        warnings.warn(
            f"nn.MultiheadAttention in {attention[:3]} reads its projection weights directly; "
            "those projections stay full precision (build attention from nn.Linear to emulate "
            "them)",
            UserWarning,
            stacklevel=2,
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            # Its eval/no_grad fast path reads linear and norm weights directly, skipping our
            # forwards; the fast path is only taken when this flag is set.
            module.activation_relu_or_gelu = 0
        mx_class = MX_CLASS_OF.get(type(module))
        if mx_class is None or _inside_attention(name, attention):
            continue
        module.__class__ = mx_class
    _apply(model, base, overrides)
    return model


def _apply(model: nn.Module, base: PrecisionScheme, overrides: Overrides) -> int:
    count = 0
    for name, module in _mx_modules(model):
        module.mx_scheme = resolve_scheme(name, base, overrides)
        count += 1
    return count


def set_scheme(
    model: nn.Module, scheme: str | PrecisionScheme, overrides: Overrides = None
) -> nn.Module:
    """Change the precision of every MX module of ``model`` (no parameter is touched).

    A partial string such as ``"norm=bf16"`` amends nothing here: it is a full scheme with the
    other roles fp32. To amend each module's current scheme use ``amend_scheme``.
    """
    base = parse_scheme(scheme)
    validate_overrides(overrides)
    if _apply(model, base, overrides) == 0:
        raise ValueError("model has no MX modules; call mxprobe.convert(model, scheme) first")
    return model


def amend_scheme(
    model: nn.Module, change: str, modules: str = "*", snap: bool = False
) -> dict[str, tuple[PrecisionScheme, PrecisionScheme]]:
    """Amend the current scheme of every MX module whose name matches the glob ``modules`` with
    the partial string ``change`` (e.g. ``"norm=bf16"``). Returns {name: (before, after)}.

    ``snap=True`` first overwrites every parameter whose forward rounding changes with the
    value the old scheme's forward used (``mxprobe.modules.snap_parameters``), so a switch to
    a finer format leaves the network's output unchanged instead of jolting it.
    """
    changed = {}
    for name, module in _mx_modules(model):
        if not fnmatch.fnmatchcase(name, modules):
            continue
        before = module.mx_scheme or PrecisionScheme()  # None means full precision = fp32
        after = before.amend(change)
        if snap:
            snap_parameters(module, before, after)
        module.mx_scheme = after
        changed[name] = (before, after)
    if not changed:
        raise ValueError(f"no MX module matches {modules!r}; names: {module_names(model)[:10]}")
    return changed


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
    """Rows of (module name, module type, {role: format}) with a printable table."""

    rows: list[tuple[str, str, dict[str, str]]]

    def __str__(self) -> str:
        header = ("module", "type", *ROLES, "block", "scale", "round", "backprop")
        lines = [header]
        for name, kind, roles in self.rows:
            lines.append((name or "<root>", kind, *(roles[r] for r in header[2:])))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        return "\n".join(
            "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        )


def _effective(module: MxModule, role: str) -> str:
    scheme = module.active_scheme() or PrecisionScheme()
    if role not in module.mx_roles:
        return "-"
    if role in BACKWARD_ROLES and not scheme.quantize_backprop:
        return "fp32"
    return getattr(scheme, role)


def describe(model: nn.Module) -> Description:
    """The effective format of every role of every MX module: ``fp32`` when switched off or
    when backprop is not quantized, ``-`` for a role the module does not have."""
    rows = []
    for name, module in _mx_modules(model):
        scheme = module.active_scheme() or PrecisionScheme()
        roles = {r: _effective(module, r) for r in ROLES}
        roles.update(
            block=str(scheme.block_size),
            scale=scheme.scale_mode,
            round=scheme.rounding,
            backprop=str(scheme.quantize_backprop).lower(),
        )
        rows.append((name, type(module).__name__, roles))
    return Description(rows)

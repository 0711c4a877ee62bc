"""The paper's proxy: a residual MLP student learning a frozen MLP teacher (arXiv 2506.20752).

Student (pre-LN residual MLP, no final LayerNorm), for k = 1..depth::

    A_k = A_{k-1} + W2_k · φ(W1_k · LN(A_{k-1}))

LN has an affine weight and bias; W1 (``fc1``) maps d -> 4d without bias, W2 (``fc2``) maps
4d -> d with bias. φ is GELU, ReLU, the identity, or SwiGLU, whose hidden width is round(8d/3)
so that its parameter count matches the 4d MLP: ``fc1`` then maps d -> 2·hidden (value and gate)
and φ(u) = SiLU(gate) * value.

Teacher (frozen, no residual, no LN), ``depth`` blocks of::

    h = V2_k · φ(V1_k · h)        V1, V2: d -> d, no bias

(for SwiGLU, V1 maps d -> 2d and is split into value and gate).

Every operation that MX emulation must reach is an ``nn`` module (``nn.Linear``,
``nn.LayerNorm``, ``nn.GELU``, ``nn.ReLU``, ``nn.SiLU``), never ``torch.nn.functional``, so that
``mxprobe.convert`` swaps all of them — the paper's released code applied GELU through a
function captured before patching, which left it un-emulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = ("gelu", "swiglu", "relu", "linear")
INITS = ("default", "custom")


@dataclass
class ProxyConfig:
    """Shape and initialisation of the student (and of the teacher it learns)."""

    depth: int = 4
    """Number of residual blocks (the teacher has as many non-residual blocks)."""
    width: int = 512
    """Model width d."""
    activation: str = "gelu"
    """φ: one of ``gelu``, ``swiglu``, ``relu``, ``linear``."""
    layer_norm: bool = True
    """Pre-LN in every block; ``False`` is the paper's "no LN" ablation."""
    init: str = "default"
    """``default``: PyTorch's own init (the paper). ``custom``: N(0, 0.02) weights, zero biases,
    LN γ=1 β=0, and ``fc2`` scaled by 1/sqrt(2·depth) as in GPT-2."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {', '.join(INITS)}")
        if self.depth < 1 or self.width < 1:
            raise ValueError(
                f"depth and width must be positive, got depth={self.depth} width={self.width}"
            )

    @property
    def hidden(self) -> int:
        """Hidden width of one student MLP: 4d, or round(8d/3) for SwiGLU."""
        return round(8 * self.width / 3) if self.activation == "swiglu" else 4 * self.width


class SwiGLU(nn.Module):
    """φ(u) = SiLU(gate) * value for u = [value, gate] split on the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.silu = nn.SiLU()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        value, gate = u.chunk(2, dim=-1)
        return self.silu(gate) * value


def make_activation(name: str) -> nn.Module:
    """The φ module for ``name`` (see :data:`ACTIVATIONS`)."""
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    if name == "swiglu":
        return SwiGLU()
    if name == "linear":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    """W2 · φ(W1 · x): fc1 without bias, fc2 with bias."""

    def __init__(self, cfg: ProxyConfig) -> None:
        super().__init__()
        fan_out = 2 * cfg.hidden if cfg.activation == "swiglu" else cfg.hidden
        self.fc1 = nn.Linear(cfg.width, fan_out, bias=False)
        self.act = make_activation(cfg.activation)
        self.fc2 = nn.Linear(cfg.hidden, cfg.width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, d) -> (B, hidden) -> (B, d)


class Block(nn.Module):
    """A_k = A_{k-1} + MLP(LN(A_{k-1}))."""

    def __init__(self, cfg: ProxyConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.width) if cfg.layer_norm else nn.Identity()
        self.mlp = MLP(cfg)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a + self.mlp(self.ln(a))


class Student(nn.Module):
    """The residual MLP the paper trains; no final LayerNorm."""

    def __init__(self, cfg: ProxyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        if cfg.init == "custom":
            self._custom_init()

    def _custom_init(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("ln.weight"):
                nn.init.ones_(p)
            elif p.dim() == 1:
                nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.depth) if "fc2" in name else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)  # (B, d)
        return x


class TeacherBlock(nn.Module):
    """h -> V2 · φ(V1 · h), both bias-free, no residual."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width if activation == "swiglu" else width, bias=False)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(width, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(h)))


class Teacher(nn.Module):
    """The frozen target network; ``gain`` multiplies every weight after PyTorch's init.

    With gain 1 (the paper) each bias-free default-initialised Linear shrinks the signal's
    variance about threefold, so the targets of a 4-block GELU teacher have variance ~1e-6: the
    student mostly learns to cancel its own residual stream. A gain near 2 keeps the signal's
    scale through the blocks, so the targets carry signal.
    """

    def __init__(self, width: int, depth: int, activation: str, gain: float = 1.0) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(TeacherBlock(width, activation) for _ in range(depth)))
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(gain)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def build_student(cfg: ProxyConfig, seed: int) -> Student:
    """The student initialised from ``seed`` alone (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Student(cfg)


def build_teacher(width: int, depth: int, activation: str, seed: int, gain: float = 1.0) -> Teacher:
    """The frozen teacher initialised from ``seed`` alone (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Teacher(width, depth, activation, gain).eval()

"""An OLMo-style decoder-only transformer for byte-level language modelling: the paper's LLM.

Reads top to bottom like nanoGPT's ``model.py``: ``rope_tables``, ``CausalSelfAttention``,
``MLP``, ``Block``, the ``LLMConfig`` dataclass, ``LLM``. The OLMo choices of the paper
(arXiv 2506.20752): pre-norm blocks, LayerNorm with an affine weight and no bias, QK-LayerNorm,
rotary position embeddings, a GELU MLP of ratio 4, no linear biases, untied embeddings,
context 512, and ``d_model = 64 * n_layer`` with heads of 64.

Everything that mxprobe emulates is a module that ``mxprobe.convert`` reaches: every linear is an
``nn.Linear``, every norm an ``nn.LayerNorm``, the activation an ``nn.GELU``/``nn.SiLU``, and with
``mx_attention`` the two attention products ``q @ k^T`` and ``p @ v`` are ``MxMatmul`` modules
(``scores`` and ``mix``). Without ``mx_attention`` attention runs through
``F.scaled_dot_product_attention`` and its products stay in full precision. RoPE and the softmax
always compute in the input dtype.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from mxprobe.modules import MxMatmul

PAPER_CONTEXT = 512
PAPER_BATCH_SIZE = 512  # sequences per step in the paper's sweep: 512 x 512 tokens
PAPER_HEAD_SIZE = 64

# name -> (n_layer, d_model, n_head, context). "tiny" trains tens of steps per second on two CPU
# cores; "L<n>" is the paper's family for any n (d = 64 n, heads of 64, context 512).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 64, 2, 64),
    "small": (4, 128, 2, 128),
    **{f"L{n}": (n, 64 * n, n, PAPER_CONTEXT) for n in (2, 4, 6, 8, 12, 16, 20, 24)},
}
MLP_KINDS = ("gelu", "swiglu")


def size_shape(size: str) -> tuple[int, int, int, int]:
    """(n_layer, d_model, n_head, context) of a named size; ``L<n>`` works for any n >= 1."""
    if size in SIZES:
        return SIZES[size]
    match = re.fullmatch(r"L([1-9][0-9]*)", size)
    if match is None:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)} or L<n>")
    n = int(match.group(1))
    return n, 64 * n, n, PAPER_CONTEXT


@dataclasses.dataclass
class LLMConfig:
    """Shape and architecture of :class:`LLM`. Shape fields left ``None`` come from ``size``.

    Example::

        >>> LLMConfig(size="L4").d_model, LLMConfig(size="tiny", context=128).context
        (256, 128)
    """

    size: str = "tiny"
    """Named size filling the shape fields left None: ``tiny``, ``small`` or ``L<n>``
    (the paper's family: n layers, d = 64 n, n heads of 64, context 512)."""
    n_layer: int | None = None
    """Number of transformer blocks."""
    d_model: int | None = None
    """Residual stream width."""
    n_head: int | None = None
    """Attention heads; ``d_model`` must be a multiple."""
    context: int | None = None
    """Sequence length (RoPE tables are built for this many positions)."""
    vocab_size: int = 256
    """Byte-level: 256."""
    mlp: str = "gelu"
    """``gelu`` (OLMo/paper) or ``swiglu`` (hidden width 2/3 of the GELU MLP's, same parameters)."""
    mlp_ratio: float = 4.0
    """Hidden width of the GELU MLP over ``d_model``."""
    qk_norm: bool = True
    """LayerNorm on queries and keys (over the full width, as OLMo) before RoPE."""
    norm_bias: bool = False
    """Give every LayerNorm an additive bias (OLMo: no)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    mx_attention: bool = False
    """Compute q @ k^T and p @ v with ``MxMatmul`` modules (MX-emulated once converted) instead
    of ``F.scaled_dot_product_attention``."""
    init_std: float = 0.02
    """Std of the normal init; output projections get ``init_std / sqrt(2 n_layer)``."""

    def __post_init__(self) -> None:
        n_layer, d_model, n_head, context = size_shape(self.size)
        for name, value in (
            ("n_layer", n_layer),
            ("d_model", d_model),
            ("n_head", n_head),
            ("context", context),
        ):
            if getattr(self, name) is None:
                setattr(self, name, value)
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        if self.head_size % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.head_size}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"unknown mlp {self.mlp!r}; expected one of {', '.join(MLP_KINDS)}")

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_hidden(self) -> int:
        hidden = self.mlp_ratio * self.d_model
        return round(2 * hidden / 3) if self.mlp == "swiglu" else round(hidden)


def rope_tables(head_size: int, context: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (context, head_size), halves repeated."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + hs/2) of ``x`` (B, H, T, hs) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_norm = nn.LayerNorm(d, bias=config.norm_bias) if config.qk_norm else None
        self.k_norm = nn.LayerNorm(d, bias=config.norm_bias) if config.qk_norm else None
        self.proj = nn.Linear(d, d, bias=False)
        self.mx_attention = config.mx_attention
        if config.mx_attention:
            self.scores = MxMatmul()  # q @ k^T
            self.mix = MxMatmul()  # softmax(scores) @ v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])  # (B, H, T, hs)
        if self.mx_attention:
            att = self.scores(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B,H,T,T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = F.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
            y = self.mix(att, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        d, hidden = config.d_model, config.mlp_hidden
        self.fc = nn.Linear(d, hidden, bias=False)
        self.gate = nn.Linear(d, hidden, bias=False) if config.mlp == "swiglu" else None
        self.act = nn.SiLU() if config.mlp == "swiglu" else nn.GELU()
        self.proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            h = self.act(self.fc(x))  # GELU(x W1)
        else:
            h = self.act(self.gate(x)) * self.fc(x)  # SwiGLU: SiLU(x W_gate) * (x W_up)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.norm_bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.norm_bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class LLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.norm_bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # untied
        cos, sin = rope_tables(config.head_size, config.context, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Residual-branch outputs scaled by depth, as GPT-2 and nanoGPT do.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.config.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.config.context}")
        x = self.wte(idx)  # (B, T, d)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def count_parameters(config: LLMConfig, *, embedding: bool = True) -> int:
    """Parameters of ``LLM(config)``, counted on the meta device (nothing is allocated).

    ``embedding=False`` leaves out the input embedding table (a lookup, no FLOPs); the untied
    output head stays in.
    """
    with torch.device("meta"):
        model = LLM(config)
    total = sum(p.numel() for p in model.parameters())
    return total if embedding else total - model.wte.weight.numel()


def steps_for_flops(
    flops: float,
    config: LLMConfig,
    *,
    batch_size: int = PAPER_BATCH_SIZE,
    context: int | None = None,
) -> int:
    """Training steps that spend ``flops`` at 6 N D, as the paper's compute sweep did.

    N is the non-embedding parameter count (``count_parameters(embedding=False)``), D the tokens
    seen, ``batch_size * context`` per step (512 x 512 by default). Rounded down, at least 1.
    """
    tokens_per_step = batch_size * (context or config.context)
    return max(1, int(flops // (6 * count_parameters(config, embedding=False) * tokens_per_step)))


def size_table(names: list[str] | None = None, flops: float | None = None) -> str:
    """A printable table of the named sizes with their parameter counts (and, given ``flops``,
    the steps of 512 x 512 tokens that budget buys)."""
    header = ["size", "n_layer", "d_model", "n_head", "context", "params", "non-emb params"]
    if flops is not None:
        header.append(f"steps @ {flops:.3g} FLOPs")
    rows = [header]
    for name in names or list(SIZES):
        config = LLMConfig(size=name)
        row = [
            name,
            str(config.n_layer),
            str(config.d_model),
            str(config.n_head),
            str(config.context),
            f"{count_parameters(config):,}",
            f"{count_parameters(config, embedding=False):,}",
        ]
        if flops is not None:
            row.append(f"{steps_for_flops(flops, config, context=PAPER_CONTEXT):,}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


if __name__ == "__main__":
    print(size_table())

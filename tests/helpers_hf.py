"""Tiny random-init transformers models (nothing downloaded), in eval mode (no dropout)."""

from __future__ import annotations

import torch
import transformers

# The decoder size shared by the Llama-style configs: 2 layers, d=64, grouped-query attention.
DECODER = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER))


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0
    )
    config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config)


def qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**DECODER, head_dim=16))


MODELS = {"llama": llama, "gpt2": gpt2, "qwen3": qwen3}


def pair(name: str, seed: int = 0):
    """(model to convert, an identical unconverted copy), both in eval mode."""
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    reference = MODELS[name]().eval()
    reference.load_state_dict(model.state_dict())
    return model, reference


def tokens(seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def move_norm_weights_off_grid(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights 1 + small noise: not exactly representable in e4m3, so MX moves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.05 * torch.randn(p.shape, generator=g))

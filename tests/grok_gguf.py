"""Tiny random Grok-1 GGUFs (llama.cpp's `grok` architecture) and llama.cpp's logits for them.

Grok-1 has no `transformers` class, so llama.cpp is the truth for it. `write(path, case)` writes the same
seeded F32 weights every time (numpy's PCG64 stream is stable across platforms); tests/data/grok_tiny_logits.npz
holds what llama.cpp (llama-cpp-python 0.3.36) computed from them. No test runs llama.cpp; to regenerate the
logits, from the repository root, write the files with the project's environment (it has `gguf`), then run
them in one that has llama-cpp-python:

    PYTHONPATH=tests python -m grok_gguf write /tmp/grok
    PYTHONPATH=tests python -m grok_gguf run /tmp/grok tests/data/grok_tiny_logits.npz
"""

from __future__ import annotations

import math
import sys

import numpy as np

DIM, N_HEADS, N_KV_HEADS, N_LAYERS, FFN, N_EXPERTS, N_ACTIVE, VOCAB, CTX = 64, 4, 2, 2, 128, 4, 2, 256, 64
HEAD_DIM = DIM // N_HEADS
PROMPT = [int(t) for t in np.random.default_rng(19).integers(3, VOCAB, 20)]
STEPS = 3   # greedy decode steps after the prompt: llama.cpp's argmax fed back, one token at a time

# case -> the `grok.*` keys written (absent: llama.cpp's defaults, see dllama.schema.GROK_SCALINGS)
CASES = {
    "defaults": {},
    "keys": {"embedding_scale": 40.0, "attention.output_scale": 0.3, "attn_logit_softcapping": 20.0,
             "logit_scale": 0.7, "final_logit_softcapping": 15.0},
    # what a `.m` file states implicitly (dllama.schema.grok_dlm_scalings): converts to `.m` losslessly
    "dlm": {"attention.output_scale": 1.0 / math.sqrt(HEAD_DIM)},
}


def _weights(seed: int = 0) -> dict:
    """GGUF tensor name -> float32 array (rows, cols) or stacked experts (n_experts, rows, cols).
    O(1) matrices, so attention scores reach the soft cap and the routing is decided by clear margins;
    gate rows of norm 1, so GELU's inputs are O(1) where it differs from SiLU; a small embedding, so that
    times Grok's multiplier of 78 it does not drown the blocks' outputs."""
    rng = np.random.default_rng(seed)

    def m(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm():
        return rng.uniform(0.5, 1.5, DIM).astype(np.float32)

    t = {"token_embd.weight": m(VOCAB, DIM, std=1 / 32), "output_norm.weight": norm(),
         "output.weight": m(VOCAB, DIM)}
    kv = N_KV_HEADS * HEAD_DIM
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": norm(), p + "attn_q.weight": m(DIM, DIM),
                  p + "attn_k.weight": m(kv, DIM), p + "attn_v.weight": m(kv, DIM),
                  p + "attn_output.weight": m(DIM, DIM), p + "attn_output_norm.weight": norm(),
                  p + "ffn_norm.weight": norm(), p + "ffn_gate_inp.weight": m(N_EXPERTS, DIM),
                  p + "ffn_gate_exps.weight": m(N_EXPERTS, FFN, DIM, std=DIM ** -0.5),
                  p + "ffn_up_exps.weight": m(N_EXPERTS, FFN, DIM),
                  p + "ffn_down_exps.weight": m(N_EXPERTS, DIM, FFN), p + "layer_output_norm.weight": norm()})
    return t


def write(path, case: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "grok")
    w.add_name(f"grok-tiny-{case}")
    for add, v in [(w.add_context_length, CTX), (w.add_embedding_length, DIM), (w.add_block_count, N_LAYERS),
                   (w.add_feed_forward_length, FFN), (w.add_head_count, N_HEADS), (w.add_head_count_kv, N_KV_HEADS),
                   (w.add_rope_dimension_count, HEAD_DIM), (w.add_expert_count, N_EXPERTS),
                   (w.add_expert_used_count, N_ACTIVE), (w.add_vocab_size, VOCAB)]:
        add(v)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for key, value in CASES[case].items():
        w.add_float32(f"grok.{key}", value)
    # a byte-free vocabulary is enough: the tests feed token ids
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    w.add_token_merges(["t 1"])   # llama.cpp needs a merge list; no text is ever tokenized
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, x in _weights().items():
        w.add_tensor(name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(path) -> np.ndarray:
    """(1 + STEPS, VOCAB): llama.cpp's logits after the prompt (one batch), then after each greedy token
    (the argmax of the row before it).
    F32 KV cache (llama.cpp's default f16 would round K and V); flash attention is off for grok anyway."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=CTX, n_batch=CTX, n_threads=2, type_k=0, type_v=0, logits_all=True,
                          flash_attn=False, verbose=False)
    out = []
    llm.eval(PROMPT)
    out.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
    for _ in range(STEPS):
        llm.eval([int(np.argmax(out[-1]))])
        out.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
    return np.stack(out)


def main(argv) -> None:
    import json

    if argv[0] == "write":
        for case in CASES:
            write(f"{argv[1]}/{case}.gguf", case)
        return
    import llama_cpp

    arrays = {case: llama_cpp_logits(f"{argv[1]}/{case}.gguf") for case in CASES}
    info = {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode()}
    np.savez_compressed(argv[2], **arrays, info=np.array(json.dumps(info)))


if __name__ == "__main__":
    main(sys.argv[1:])

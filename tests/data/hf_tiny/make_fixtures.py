"""Writes the tiny checkpoints of this folder and their GGUFs made by llama.cpp's own converter.

    python tests/data/hf_tiny/make_fixtures.py LLAMA_CPP_DIR [CASE ...]

LLAMA_CPP_DIR is `vendor/llama.cpp` of the llama-cpp-python 0.3.36 source distribution
(`pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`), whose `convert_hf_to_gguf.py`
reads the `rope_parameters` that transformers 5 writes. It runs with its bundled `gguf-py`, with two
changes to what it does with the vocabulary, none to the tensors: its SentencePiece reader raises
FileNotFoundError at once (these folders have no tokenizer.model, which is what it raises then, but it
imports the `sentencepiece` package first, which is no dllama dependency), and `tokenizer.ggml.pre` set to `gpt-2`, since the converter refuses a BPE
vocabulary whose test-string hash is not one of the published models' (this one is trained here).
Needs torch, transformers and tokenizers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # tests/

import hf_checkpoint  # noqa: E402
import hf_export  # noqa: E402

# small shapes: the folder and the GGUF are a few hundred kB together
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64)
CASES = {
    "llama": dict(kind="llama"),
    # Llama 3.1 rope scaling, which llama.cpp writes as a rope_freqs tensor
    "llama31": dict(kind="llama", rope=hf_export.LLAMA3_ROPE, max_position_embeddings=1024),
    "mistral": dict(kind="mistral", tie_word_embeddings=True),
    "mixtral": dict(kind="mixtral", intermediate_size=32),
    "qwen3": dict(kind="qwen3", head_dim=16),
    "qwen3_moe": dict(kind="qwen3_moe", head_dim=16, moe_intermediate_size=32),
}
SEED = 7

_RUN = """
import runpy, sys
sys.path[:0] = [{gguf_py!r}, {root!r}]
from conversion import base


def no_tokenizer_model(self):
    raise FileNotFoundError("tokenizer.model")   # what it raises, sentencepiece installed, for these folders


base.TextModel._create_vocab_sentencepiece = no_tokenizer_model
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", {folder!r}, "--outtype", "f32", "--outfile", {out!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def make(name: str, llama_cpp: str) -> None:
    args = dict(CASES[name])
    kind = args.pop("kind")
    tied = args.pop("tie_word_embeddings", False)
    folder = os.path.join(HERE, name)
    shutil.rmtree(folder, ignore_errors=True)
    model = hf_export.build(kind, SEED, tied=tied, **{**SMALL, **args})
    hf_checkpoint.save_checkpoint(model, folder, "bfloat16")
    os.remove(os.path.join(folder, "generation_config.json"))   # nothing reads it
    code = _RUN.format(gguf_py=os.path.join(llama_cpp, "gguf-py"), root=llama_cpp, folder=folder,
                       out=os.path.join(HERE, f"{name}.llama_cpp.gguf"),
                       script=os.path.join(llama_cpp, "convert_hf_to_gguf.py"))
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for case in sys.argv[2:] or CASES:
        make(case, os.path.abspath(sys.argv[1]))

"""`dllama convert --hf DIR`: a Hugging Face checkpoint to `.m` + `.t`, or to GGUF.

Tensors stream from the memory-mapped shards a chunk of rows at a time (`hf.Source`) into the output,
so memory holds a chunk, never the checkpoint. The output appears only when complete (temporary names,
renamed at the end; `dlm.atomic_paths`). The GGUF is laid out as llama.cpp's `convert_hf_to_gguf.py`
lays out the same architecture: its names, Q/K order, stacked experts, F32 norms and router, Llama 3.1
scaling as `rope_freqs`, no `output.weight` for tied embeddings.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dllama import quants, schema
from dllama.errors import DllamaError
from dllama.formats import hf
from dllama.formats.spec import ModelSpec

GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}


def open_checkpoint(folder: str, weight_type: str) -> tuple[hf.Checkpoint, ModelSpec]:
    ckpt = hf.Checkpoint(folder)
    spec = hf.spec_from_config(ckpt.config, folder)
    return ckpt, dataclasses.replace(spec, weight_type=weight_type)


def convert_hf(folder: str, output_model: str, output_tokenizer: str | None = None,
               weight_type: str = "q40") -> ModelSpec:
    """Converts the checkpoint in `folder` to `output_model` (GGUF when it ends in .gguf, else `.m`, with
    the `.t` at output_tokenizer). Returns the written spec. Raises DllamaError."""
    from dllama.formats.dlm import atomic_paths

    gguf_out = output_model.lower().endswith(".gguf")
    if gguf_out and output_tokenizer:
        raise DllamaError("--output-tokenizer: a GGUF output carries its tokenizer; give it only for a .m output")
    ckpt, spec = open_checkpoint(folder, weight_type)
    try:
        vocab = None
        if gguf_out or output_tokenizer:
            from dllama.formats.hf_tokenizer import read_vocab
            vocab = read_vocab(folder, spec.vocab_size, ckpt.config)
        if not gguf_out:
            from dllama.formats.dlm import header_items
            header_items(dataclasses.replace(spec, tied_embeddings=False))   # refuse before writing anything
        outputs = [output_model] + ([output_tokenizer] if output_tokenizer else [])
        with atomic_paths(outputs) as temps:
            if gguf_out:
                write_gguf(temps[0], spec, hf.sources(ckpt, spec), vocab, ckpt.config)
            else:
                _write_m(temps[0], spec, hf.sources(ckpt, spec))
                if output_tokenizer:
                    from dllama.formats.dlt import write_t
                    from dllama.tokenizer import Tokenizer
                    write_t(temps[1], Tokenizer(**vocab))
    finally:
        ckpt.close()
    return spec


def _write_m(path: str, spec: ModelSpec, sources: dict) -> None:
    from dllama.formats.convert import with_progress
    from dllama.formats.dlm import dlm_layout, write_dlm_to, write_key_set

    spec = dataclasses.replace(spec, tied_embeddings=False)   # the `.m` format always holds wcls
    items = ((name, sources[name].chunks()) for name, _, _ in dlm_layout(spec, write_key_set(spec)))
    with open(path, "wb") as f:
        write_dlm_to(f, spec, with_progress(items, spec.n_layers, "convert"))


def _gguf_type(row: schema.TensorDef, weight_type: str) -> str:
    # as llama.cpp: vectors and the router stay F32 whatever the file type
    return "f32" if row.take == schema.VECTOR or row.leaf == "moe_gate" else weight_type


def gguf_plan(spec: ModelSpec, sources: dict) -> list[tuple[str, str, tuple, list]]:
    """[(GGUF name, qtype, shape, [Source, ...])]: one Source per tensor, one per expert for stacked ones."""
    plan, stacks = [], {}
    for name, row, (layer, expert) in schema.entries(spec):
        if row.leaf == "wcls" and spec.tied_embeddings:
            continue
        qtype = _gguf_type(row, spec.weight_type)
        gname = row.gguf_name(layer)
        if expert is None:
            plan.append((gname, qtype, row.shape(spec), [sources[name]]))
        elif gname in stacks:
            stacks[gname][3].append(sources[name])
        else:
            stacks[gname] = (gname, qtype, (spec.n_experts, *row.shape(spec)), [sources[name]])
            plan.append(stacks[gname])
    return plan


def _metadata(w, spec: ModelSpec, config: dict) -> None:
    w.add_name(spec.name)
    w.add_file_type({"f32": 0, "f16": 1, "q40": 2, "q80": 7}[spec.weight_type])   # llama.cpp's LlamaFileType
    w.add_vocab_size(spec.vocab_size)
    w.add_context_length(spec.seq_len)
    w.add_embedding_length(spec.dim)
    w.add_block_count(spec.n_layers)
    w.add_feed_forward_length(spec.hidden_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    if config.get("head_dim"):   # llama.cpp writes these when config.json states head_dim
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    if spec.rope_type == "llama3.1":   # the band's edge, which rope_freqs alone does not tell a reader
        w.add_rope_scaling_orig_ctx_len(spec.rope_scaling_orig_max_seq_len)
    if spec.n_experts:
        w.add_expert_count(spec.n_experts)
        w.add_expert_used_count(spec.n_active_experts)
    if spec.moe_hidden_dim:
        w.add_expert_feed_forward_length(spec.moe_hidden_dim)


def _tokenizer_metadata(w, vocab: dict) -> None:
    import gguf

    w.add_tokenizer_model(vocab["kind"])
    if vocab["kind"] == "gpt2":
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_merges(vocab["merges"])
    else:
        w.add_token_scores(vocab["scores"])
        w.add_add_space_prefix(True)
    w.add_token_list(vocab["tokens"])
    w.add_token_types([gguf.TokenType(t) for t in vocab["types"]])
    if vocab["bos_id"] is not None:
        w.add_bos_token_id(vocab["bos_id"])
    if vocab["eos_id"] is not None:
        w.add_eos_token_id(vocab["eos_id"])
    w.add_add_bos_token(vocab["add_bos"])
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])


def write_gguf(path: str, spec: ModelSpec, sources: dict, vocab: dict, config: dict) -> None:
    """Writes the GGUF at `path`, tensor data streamed chunk by chunk after the header; `config` is the
    checkpoint's config.json."""
    import gguf

    plan = gguf_plan(spec, sources)
    factors = hf.rope_factors(spec)
    w = gguf.GGUFWriter(path, GGUF_ARCH[spec.arch])
    _metadata(w, spec, config)
    _tokenizer_metadata(w, vocab)
    if factors is not None:
        w.add_tensor("rope_freqs.weight", factors)
    for gname, qtype, shape, _ in plan:
        nbytes = quants.tensor_bytes(qtype, shape)
        byte_shape = (*shape[:-1], quants.row_bytes(qtype, shape[-1])) if len(shape) > 1 else (nbytes,)
        w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=quants.quant(qtype).gguf)
    try:
        _write_gguf_data(w, plan, factors)
    finally:
        w.close()


def _write_gguf_data(w, plan: list, factors: np.ndarray | None) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    if factors is not None:
        w.write_padding(fout, fout.tell())
        factors.tofile(fout)
        w.write_padding(fout, factors.nbytes)
    for gname, qtype, shape, parts in plan:
        w.write_padding(fout, fout.tell())
        n = 0
        for src in parts:
            for chunk in src.chunks():
                raw = quants.quantize(qtype, chunk)
                fout.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
                n += raw.nbytes
        if n != quants.tensor_bytes(qtype, shape):
            raise DllamaError(f"writing GGUF tensor {gname} {shape}: {n} bytes, expected "
                              f"{quants.tensor_bytes(qtype, shape)}")
        w.write_padding(fout, n)

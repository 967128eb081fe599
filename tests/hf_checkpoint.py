"""Tiny Hugging Face checkpoint folders, as `save_pretrained` writes them, for `dllama convert --hf`.

The model comes from `hf_export.build` (seeded, O(1)-scale weights); the tokenizer is a byte-level BPE
trained by the `tokenizers` package on a fixed text (deterministic), saved by transformers'
`PreTrainedTokenizerFast` with a chat template, bos and eos, so that llama.cpp's converter and
transformers itself read the same folder.
"""

from __future__ import annotations

TEXT = ("the quick brown fox jumps over the lazy dog. the dog sleeps; the fox runs away!\n"
        "hello world, hello there. numbers 123 and 4567 go here? yes: they do.\n") * 4
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def save_tokenizer(folder, vocab_size: int, pre_tokenizer=None):
    """A byte-level BPE of at most `vocab_size` tokens (specials last) saved into `folder`; returns it.
    pre_tokenizer: a `tokenizers` pre-tokenizer (default: ByteLevel alone, GPT-2's split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def save_checkpoint(model, folder, dtype: str = "bfloat16"):
    """`model` stored as `dtype` with save_pretrained into `folder`, with a tokenizer. Returns the folder
    as transformers reads it in float32 (`load`): what the checkpoint holds, computed in float32."""
    import torch

    tok = save_tokenizer(folder, model.config.vocab_size)
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.to(getattr(torch, dtype))
    model.save_pretrained(str(folder))
    return load(folder)


def load(folder):
    """The checkpoint in `folder` as a float32 transformers model in eval mode, with the eager attention and
    experts that `hf_export.build` also uses."""
    import json
    import os

    import torch
    from transformers import AutoModelForCausalLM

    with open(os.path.join(str(folder), "config.json")) as f:
        model_type = json.load(f)["model_type"]
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if model_type in ("mixtral", "qwen3_moe"):
        kw["experts_implementation"] = "eager"
    return AutoModelForCausalLM.from_pretrained(str(folder), **kw).eval()


def save_spm_tokenizer(folder, vocab_size: int = 200):
    """A SentencePiece-style BPE as Llama 2 and Mistral v0.1 ship it in tokenizer.json: `▁` for spaces
    (normalizer), byte fallback to the 256 `<0xNN>` tokens after `<unk> <s> </s>`; saved into `folder`."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        show_progress=False))
    j = json.loads(tok.to_str())
    learned = [t for t, _ in sorted(j["model"]["vocab"].items(), key=lambda x: x[1]) if t not in specials]
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + learned
    j["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    j["added_tokens"] = [dict(a, id=order.index(a["content"])) for a in j["added_tokens"]]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(j)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast

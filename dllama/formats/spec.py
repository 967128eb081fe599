"""One description of a model, whatever file it came from (.m, GGUF)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ModelSpec:
    arch: str = "llama"            # "llama" (also Mistral/TinyLlama/SmolLM2), "mixtral", "grok1", "qwen3", "qwen3_moe"
    dim: int = 0                   # width of the residual stream x
    hidden_dim: int = 0            # FFN width (per expert for MoE models)
    n_layers: int = 0
    n_heads: int = 0               # query heads
    n_kv_heads: int = 0            # key/value heads (grouped-query attention when < n_heads)
    head_dim: int = 0              # usually dim // n_heads
    vocab_size: int = 0
    seq_len: int = 0               # context length the model was trained for
    n_experts: int = 0             # 0 for dense models
    n_active_experts: int = 0
    moe_hidden_dim: int = 0        # FFN width of one expert where the file says so (Qwen3 MoE)
    hidden_act: str = "silu"       # "silu" or "gelu"
    rope_type: str = "llama"       # "llama" (adjacent pairs), "llama3.1" (llama + frequency scaling), "falcon" (halves, neox)
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    rope_scaling_low_freq_factor: float = 0.0
    rope_scaling_high_freq_factor: float = 0.0
    rope_scaling_orig_max_seq_len: int = 0
    norm_eps: float = 1e-5
    weight_type: str = "q40"       # dominant matmul weight type: "f32", "f16", "q40", "q41", "q80"
    tied_embeddings: bool = False  # the output matrix is the token embedding
    # Grok-1's scalings (llama.cpp's `grok` hparams); 0 leaves the step out (attn_scale 0: 1/sqrt(head_dim))
    embedding_scale: float = 0.0   # the token embedding times this
    attn_scale: float = 0.0        # q.k times this before the soft cap
    attn_softcap: float = 0.0      # attention scores c * tanh(s / c)
    logit_scale: float = 0.0       # the output logits times this
    final_softcap: float = 0.0     # then logits c * tanh(l / c)
    name: str = ""                 # human name (GGUF general.name, or the file stem)
    extra: dict = field(default_factory=dict)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        return self.moe_hidden_dim if self.moe_hidden_dim else self.hidden_dim

    def to_dict(self) -> dict:
        """A JSON-safe dict (numpy arrays in `extra`, such as a GGUF's rope_freqs, become lists)."""
        d = asdict(self)
        d["extra"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in self.extra.items()}
        return d

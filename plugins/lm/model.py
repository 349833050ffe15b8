"""A Llama-style decoder in plain PyTorch: RMSNorm, rotary embeddings, SwiGLU, grouped-query
attention through ``scaled_dot_product_attention``. Parameter names are Hugging Face's, so a
``state_dict`` loads into ``transformers.LlamaForCausalLM`` and back unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmos.plugins.lm.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(config: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for ``positions`` ([T] or [B, T]), shaped to broadcast over heads."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    if emb.dim() == 2:
        emb = emb[None]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int, slots: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, span: slice | None = None) -> torch.Tensor:
        """Attend new tokens (at ``positions`` of the sequences in cache ``slots``) over everything cached so far."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_all, v_all = cache.write(layer, slots, positions, k, v, mask.shape[-1], span)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class KVCache:
    """Keys and values of up to ``slots`` sequences of up to ``length`` tokens, per layer.

    Layout [slot, kv_head, position, head_dim]: a sequence owns a slot, its token at position p
    sits at index p, so sequences of any lengths share one batch (continuous batching moves
    sequences in and out of slots between steps).
    """

    def __init__(self, config: LlamaConfig, slots: int, length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (slots, config.num_key_value_heads, length, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = length

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upto: int, span: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values; return every sequence's keys and values up to ``upto``.

        ``span``: when the slots are a contiguous range, the views of it (no copy of the cache).
        """
        kc, vc = self.k[layer], self.v[layer]
        index = (slots[:, None], slice(None), positions)  # -> [B, T, kv_head, head_dim]
        kc[index] = k.transpose(1, 2).to(kc.dtype)
        vc[index] = v.transpose(1, 2).to(vc.dtype)
        if span is not None:
            return kc[span, :, :upto], vc[span, :, :upto]
        return kc[slots, :, :upto], vc[slots, :, :upto]


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int, slots: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, span: slice | None = None) -> torch.Tensor:
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, cache, layer, slots, positions, mask, span)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """``Llama(config)(input_ids) -> logits``; parameter names match ``LlamaForCausalLM``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Normal(0, std) weights (residual projections scaled by depth), ones for the norms."""
        gen = torch.Generator().manual_seed(seed)
        scaled = std / (2 * self.config.num_hidden_layers) ** 0.5
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                else:
                    s = scaled if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(t, device=input_ids.device)
        cos, sin = rotary_tables(self.config, positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """Logits for new tokens ([B, T]) at ``positions`` ([B, T]) of the sequences in ``slots``,
        reading and extending ``cache``. With ``last_only``, only the last position's logits."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_tables(self.config, positions, x.dtype)
        upto = int(positions.max()) + 1
        keys = torch.arange(upto, device=input_ids.device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, upto]
        first, count = int(slots[0]), slots.numel()
        # Slots first..first+count-1 in order (batch 1, or a full batch): read the cache as views.
        span = slice(first, first + count) if int(slots[-1]) - first == count - 1 and (count == 1 or bool((slots.diff() == 1).all())) else None
        for i, layer in enumerate(self.model.layers):
            x = layer.forward_cached(x, cos, sin, cache, i, slots, positions, mask, span)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(input_ids)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

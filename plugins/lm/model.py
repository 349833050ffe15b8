"""A Llama-style decoder in plain PyTorch: RMSNorm, rotary embeddings, SwiGLU, grouped-query
attention through ``scaled_dot_product_attention``. Parameter names are Hugging Face's, so a
``state_dict`` loads into ``transformers.LlamaForCausalLM`` and back unchanged."""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmos.plugins.lm import kernels
from llmos.plugins.lm.config import LlamaConfig
from llmos.plugins.lm.kernels import BF16Linear, DenseLinear, PackedLinear, StepArgs, bf16_linear


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


class KVCache:
    """Keys and values of up to ``slots`` sequences of up to ``length`` tokens, for every layer.

    Layout [layer, slot, kv_head, position, head_dim]: a sequence owns a slot, its token at
    position p sits at index p, so sequences of any lengths share one batch (continuous batching
    moves sequences in and out of slots between steps). One tensor for all layers, so that a
    step takes every layer's view of the cache at once.
    """

    def __init__(self, config: LlamaConfig, slots: int, length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, length, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = length


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

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(input_ids)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def _fuse(*linears: nn.Linear) -> torch.Tensor:
    """One matrix of the linears' weights, stacked by rows; each linear's weight becomes a view of
    its rows (one copy of the weights, same parameter names)."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[row : row + n], requires_grad=lin.weight.requires_grad)
        row += n
    return fused


def _to_bf16(parent: nn.Module, names: tuple[str, ...], weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (the named linears' weights stacked by rows) rounded to one contiguous bfloat16
    matrix; each linear becomes a :class:`BF16Linear` whose weight is a view of its rows, so the
    model keeps computing (float32 activations) and drops its float32 copy."""
    fused = weight.detach().to(torch.bfloat16).contiguous()
    row = 0
    for name in names:
        lin = getattr(parent, name)
        mod = BF16Linear(lin.in_features, lin.out_features, bias=False, device="meta")
        mod.weight = nn.Parameter(fused[row : row + lin.out_features], requires_grad=False)
        setattr(parent, name, mod)
        row += lin.out_features
    return fused


def _stack(parent: nn.Module, names: tuple[str, ...]) -> PackedLinear:
    """The named layers of ``parent`` as one :class:`PackedLinear` of their rows stacked (a plain
    ``nn.Linear`` among them taken as a :class:`DenseLinear`); each named layer becomes a view of
    its rows, so the weights are held once."""
    parts = [getattr(parent, n) for n in names]
    parts = [DenseLinear(p.weight) if isinstance(p, nn.Linear) else p for p in parts]
    kinds = {type(p) for p in parts}
    if len(kinds) > 1 or not isinstance(parts[0], PackedLinear):
        raise ValueError(f"{', '.join(names)} are stored differently ({', '.join(sorted(k.__name__ for k in kinds))}); a decoder fuses them only when they share one storage")
    if len(parts) == 1:
        return parts[0]  # an nn.Linear stays in the model; its DenseLinear shares its weight
    fused, views = type(parts[0]).stack(parts)
    for name, view in zip(names, views):
        setattr(parent, name, view)
    return fused


class _Gathered:
    """Layer i's keys (or values) of the sequences in ``slots`` up to ``upto``, copied when asked."""

    def __init__(self, cache: torch.Tensor, slots: torch.Tensor, upto: int) -> None:
        self.cache, self.slots, self.upto = cache, slots, upto

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.cache[layer][self.slots, :, : self.upto]


class _Buffers:
    """Everything a single-token step for ``b`` sequences writes, and the views it reads, made
    once: the step's layers then create no tensors and no views. (A decode step is
    memory-bound matrix products with tiny ops between them; every tiny op runs with caches
    just flushed by a product, and creating a tensor or a view costs as much as a small op.)"""

    def __init__(self, c: LlamaConfig, b: int, dtype: torch.dtype, device: torch.device) -> None:
        nh, nkv, d, inter = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
        new = dict(dtype=dtype, device=device)
        self.x = torch.empty(b, c.hidden_size, **new)  # the residual stream, updated in place
        self.row = self.x[0] if b == 1 else None  # one sequence: its RMS scale comes from a dot product
        self.h = torch.empty(b, c.hidden_size, **new)
        self.qkv = torch.empty(b, (nh + 2 * nkv) * d, **new)
        self.qk = self.qkv[:, : (nh + nkv) * d].view(b, nh + nkv, d)
        self.roped = torch.empty(b, nh + nkv, d, **new)
        self.q = self.roped[:, :nh].view(b, nkv, nh // nkv, d)  # grouped by key/value head
        self.k = self.roped[:, nh:]
        self.v = self.qkv[:, (nh + nkv) * d :].view(b, nkv, d)
        self.gate_up = torch.empty(b, 2 * inter, **new)
        self.gate, self.up = self.gate_up[:, :inter], self.gate_up[:, inter:]
        self.logits = torch.empty(b, c.vocab_size, **new)
        self.args: Any = None  # the C step's arguments (see Decoder._native_step)


def _step_args(decoder: Decoder, buf: _Buffers, b: int) -> Any:
    """The C decode step's argument block for ``b`` sequences: shapes, weights and buffers set
    once; ids, slots, positions, cache and rotary tables set per call."""
    c = decoder.config
    buf.att = torch.empty(b, c.num_attention_heads * c.head_dim)
    buf.act = torch.empty(b, c.intermediate_size)
    buf.ids, buf.slots, buf.pos = ((ctypes.c_int64 * b)() for _ in range(3))
    addresses, head, wt = decoder._native_weights(b)
    a = StepArgs(
        L=c.num_hidden_layers, B=b, H=c.hidden_size, nh=c.num_attention_heads, nkv=c.num_key_value_heads, d=c.head_dim,
        inter=c.intermediate_size, V=c.vocab_size, layers=addresses.data_ptr(), norm=decoder.norm.data_ptr(),
        head=head, embed=decoder.embed.data_ptr(), ids=ctypes.addressof(buf.ids),
        slots=ctypes.addressof(buf.slots), pos=ctypes.addressof(buf.pos), eps=c.rms_norm_eps, isa=decoder.native.isa,
        wt=wt,
    )
    for name in ("x", "h", "qkv", "att", "gu", "act", "logits"):
        setattr(a, name, getattr(buf, "gate_up" if name == "gu" else name).data_ptr())
    return a


class Decoder:
    """Inference-only forward passes over a :class:`KVCache`, on the weights of a :class:`Llama`.

    A decode step is memory-bound matrix-vector products with tiny ops between them, each run
    with caches just flushed by a product, so this path keeps the tiny ops few: each layer's
    [q; k; v] and [gate; up] projections are one matrix each (4 products per layer instead of 7;
    the model's ``q_proj.weight`` etc. become views of their rows, so the model keeps one copy
    of its weights, its parameter names and its outputs); residual adds ride on ``addmm`` and,
    for one sequence, the RMS norm's scale on its ``alpha``; a single token's rotary embedding
    is one small batched product; queries are grouped by key/value head ([batch, kv_head,
    group * T, head_dim]) so attention reads the cache as it is, unmasked whenever every
    sequence is at the same position; single-token steps write into buffers made once per batch
    size (their logits too: the next step overwrites them).

    On a CPU with float32 activations, a single-token step is one call into the compiled
    kernels of :mod:`~llmos.plugins.lm.kernels` (every layer, one OpenMP region; same math up to
    summation order); the torch code here is the path without them, and prefill's. With
    ``bf16_weights`` (a float32 model on a CPU), the fused weights are kept in bfloat16 only and
    the model's linear layers become :class:`BF16Linear` views of them: float32 activations,
    norms and cache, half the bytes to read per token.
    """

    def __init__(self, model: Llama, bf16_weights: bool = False) -> None:
        c = self.config = model.config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.group, self.width = self.n_heads // self.n_kv, (c.hidden_size,)
        self.embed = model.model.embed_tokens.weight.detach()
        self.dtype, self.device = self.embed.dtype, self.embed.device
        if bf16_weights and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError("bf16_weights: a float32 model on the CPU only (elsewhere, cast the model to bfloat16)")
        # Packed mode: the model holds quantized (or otherwise packed) layers; every projection
        # runs through the PackedLinear interface, natively where each layer's kernel for the
        # batch size has a descriptor (see kernels.PackedLinear).
        self.packed = any(isinstance(m, PackedLinear) for m in model.modules())
        if self.packed and bf16_weights:
            raise ValueError("bf16_weights: this model's weights are already packed (quantized); run it with float32 activations")
        self.bf16 = bf16_weights
        self.layers, self.weights = [], []
        self._native_for: dict[int, Any] = {}
        with torch.no_grad():
            for layer in model.model.layers if self.packed else ():
                a, m = layer.self_attn, layer.mlp
                norms = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
                qkv, o = _stack(a, ("q_proj", "k_proj", "v_proj")), _stack(a, ("o_proj",))
                gate_up, down = _stack(m, ("gate_proj", "up_proj")), _stack(m, ("down_proj",))
                self.layers.append((norms[0], qkv, o, norms[1], gate_up, down))
            for layer in model.model.layers if not self.packed else ():
                a, m = layer.self_attn, layer.mlp
                qkv, gate_up = _fuse(a.q_proj, a.k_proj, a.v_proj), _fuse(m.gate_proj, m.up_proj)
                o, down = a.o_proj.weight.detach(), m.down_proj.weight.detach()
                if bf16_weights:
                    qkv, gate_up = _to_bf16(a, ("q_proj", "k_proj", "v_proj"), qkv), _to_bf16(m, ("gate_proj", "up_proj"), gate_up)
                    o, down = _to_bf16(a, ("o_proj",), o), _to_bf16(m, ("down_proj",), down)
                norms = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
                self.weights.append((norms[0], qkv, o, norms[1], gate_up, down))  # [out, in], as the model's
                if bf16_weights:  # bf16_linear takes [out, in]
                    self.layers.append(self.weights[-1])
                else:  # addmm takes [in, out]
                    self.layers.append((norms[0], qkv.t(), o.t(), norms[1], gate_up.t(), down.t()))
            if self.packed:
                self.head_w = _stack(model, ("lm_head",))
            else:
                self.head_w = _to_bf16(model, ("lm_head",), model.lm_head.weight) if bf16_weights else model.lm_head.weight.detach()
        self.norm = model.model.norm.weight.detach()
        self.head = self.head_w if bf16_weights or self.packed else self.head_w.t()
        if self.packed:
            self.modules = [w for layer in self.layers for w in (layer[1], layer[2], layer[4], layer[5])] + [self.head_w]
            for w in self.modules:  # choose each layer's kernels now (measured once per machine), not mid-request
                w.prepare()
        self.zero = torch.zeros(1, 1, dtype=self.dtype, device=self.device)  # addmm's ignored input (beta=0)
        half = self.head_dim // 2
        swap = torch.zeros(self.head_dim, self.head_dim)  # x @ swap == rotate_half(x)
        swap[torch.arange(half) + half, torch.arange(half)] = -1.0
        swap[torch.arange(half), torch.arange(half) + half] = 1.0
        self.swap = swap.to(self.device, self.dtype)
        self.cos = self.sin = torch.empty(0)
        self.buffers: dict[int, _Buffers] = {}
        self.native = self._native()
        if self.native is not None and not self.packed:
            self.addresses = torch.tensor([w.data_ptr() for layer in self.weights for w in layer], dtype=torch.int64)

    def _native_weights(self, b: int) -> Any:
        """(layer addresses, head address, weight type) for the C step at batch size ``b``, or
        None when some packed layer's kernel for ``b`` is not native (the torch step runs then)."""
        if b in self._native_for:
            return self._native_for[b]
        if not self.packed:
            found = (self.addresses, self.head_w.data_ptr(), 0 if self.bf16 else 1)
        else:
            descs, addresses = [], []
            for layer in self.layers:
                for w in layer:  # norms are tensors, projections PackedLinears
                    if isinstance(w, torch.Tensor):
                        addresses.append(w.data_ptr())
                        continue
                    d = w.descriptor(b)
                    descs.append(d)
                    addresses.append(ctypes.addressof(d) if d is not None else 0)
            head = self.head_w.descriptor(b)
            descs.append(head)
            found = None
            if all(d is not None for d in descs):
                found = (torch.tensor(addresses, dtype=torch.int64), ctypes.addressof(head), 2)
                found[0].descs = descs  # type: ignore[attr-defined]  # keep the descriptors alive with the array
        self._native_for[b] = found
        return found

    def _native(self) -> Any:
        """The compiled kernels for a whole single-token step, where they apply: float32
        activations on the CPU, contiguous weights, and a kernel that built (see kernels.py)."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        if self.packed:
            return kernels._load_native()
        tensors = [self.embed, self.norm, self.head_w, *(w for layer in self.weights for w in layer)]
        if not all(t.is_contiguous() for t in tensors):
            return None
        return kernels._load_native()

    def _mm(self, a: torch.Tensor, w: Any) -> torch.Tensor:
        if self.packed:
            return w(a)
        return bf16_linear(a, w) if self.bf16 else torch.mm(a, w)

    def _addmm(self, x: torch.Tensor, a: torch.Tensor, w: Any) -> torch.Tensor:
        if self.packed:
            return w(a, residual=x)
        return bf16_linear(a, w, residual=x) if self.bf16 else torch.addmm(x, a, w)

    def _rotary(self, length: int) -> None:
        """cos and sin of positions 0 .. length - 1, in the model's dtype: [length, head_dim]."""
        cos, sin = rotary_tables(self.config, torch.arange(length, device=self.device), self.dtype)
        self.cos, self.sin = cos[0, 0], sin[0, 0]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> float:
        """Write RMSNorm(x) into ``out`` up to a factor, and return the factor (for ``addmm``'s
        ``alpha``): for one row, its scale (so the norm is one product and one dot), else 1."""
        if x.shape[0] == 1:
            torch.mul(x, weight, out=out)
            return 1.0 / math.sqrt(float(torch.dot(x[0], x[0])) / x.shape[1] + self.config.rms_norm_eps)
        out.copy_(F.rms_norm(x, self.width, weight, self.config.rms_norm_eps))
        return 1.0

    def __call__(self, input_ids: torch.Tensor, starts: list[int], slots: list[int], cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """Logits for new tokens ``input_ids`` [B, T] of the sequences in cache ``slots``, the
        first at position ``starts[i]``; reads and extends ``cache``. With ``last_only``, only
        the last position's logits ([B, 1, vocab])."""
        b, t = input_ids.shape
        upto = max(starts) + t
        if upto > cache.length:
            raise ValueError(f"position {upto - 1} is past the cache's {cache.length}")
        if self.cos.shape[0] < upto:
            self._rotary(max(cache.length, upto))
        if t == 1 and self.native is not None and cache.k.dtype == torch.float32 and self._native_weights(b) is not None:
            return self._native_step(input_ids.view(-1).tolist(), starts, slots, cache).view(b, 1, -1)
        # Read the cache as views when the slots are a range (serve keeps them so), else gather.
        ranged = slots == list(range(slots[0], slots[0] + b))
        span = slice(slots[0], slots[0] + b)
        aligned = ranged and all(s == starts[0] for s in starts)
        if aligned and t == 1:
            positions: Any = slice(starts[0], starts[0] + 1) if b == 1 else torch.full((b,), starts[0], device=self.device)
            mask = None  # every key so far is visible to every sequence
        else:
            positions = torch.tensor(starts, device=self.device)
            if t > 1:
                positions = (positions[:, None] + torch.arange(t, device=self.device)).view(-1)
            mask = (torch.arange(upto, device=self.device) <= positions.view(b, t, 1))[:, None]  # [B, 1, T, upto]
            if t > 1:
                mask = mask.repeat(1, 1, self.group, 1)  # query rows are (query in group, token)
        if ranged:
            keys, values = cache.k[:, span, :, :upto].unbind(0), cache.v[:, span, :, :upto].unbind(0)
        else:  # gathered per layer, once the new keys and values are in
            index = torch.tensor(slots, device=self.device)
            keys, values = _Gathered(cache.k, index, upto), _Gathered(cache.v, index, upto)
        if t == 1:
            put = (slice(None), span, slice(None), starts[0]) if aligned else None
            return self._step(input_ids.view(-1), positions, keys, values, cache, put, slots, mask).view(b, 1, -1)
        index_put = (torch.tensor(slots, device=self.device)[:, None], slice(None), positions.view(b, t))
        x = self._chunk(F.embedding(input_ids.view(-1), self.embed), b, t, positions, keys, values, cache, index_put, mask)
        if last_only:
            x, t = x.view(b, t, -1)[:, -1], 1
        return self._mm(F.rms_norm(x, self.width, self.norm, self.config.rms_norm_eps), self.head).view(b, t, -1)

    def _native_step(self, ids: list[int], starts: list[int], slots: list[int], cache: KVCache) -> torch.Tensor:
        """One token for each sequence, every layer in one call to the C kernel: logits [B, vocab], in a buffer."""
        b = len(ids)
        buf = self.buffers.get(b)
        if buf is None:
            buf = self.buffers[b] = _Buffers(self.config, b, self.dtype, self.device)
        if buf.args is None:
            buf.args = _step_args(self, buf, b)
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise IndexError(f"token ids must be in [0, {self.config.vocab_size}), got {ids}")
        if not cache.k.is_contiguous() or not cache.v.is_contiguous():
            raise ValueError("the KV cache must be contiguous")
        a = buf.args
        buf.ids[:], buf.slots[:], buf.pos[:] = ids, slots, starts
        a.k_layer, a.k_slot, a.k_head = cache.k.stride()[:3]
        a.k, a.v, a.cos, a.sin = cache.k.data_ptr(), cache.v.data_ptr(), self.cos.data_ptr(), self.sin.data_ptr()
        a.threads = torch.get_num_threads()
        self.native.step(ctypes.byref(a))
        return buf.logits

    def _step(self, ids: torch.Tensor, positions: Any, keys: Any, values: Any, cache: KVCache, put: tuple[Any, ...] | None, slots: list[int], mask: torch.Tensor | None) -> torch.Tensor:
        """One token for each of ``len(ids)`` sequences: logits [B, vocab], in a buffer. ``put``:
        where the new keys and values go when all sequences are at one position, else None."""
        b = ids.shape[0]
        if b not in self.buffers:
            self.buffers[b] = _Buffers(self.config, b, self.dtype, self.device)
        buf, zero, nq = self.buffers[b], self.zero, self.n_heads * self.head_dim
        x, h, qkv, qk, roped, q, k, v, gate_up, gate, up = buf.x, buf.h, buf.qkv, buf.qk, buf.roped, buf.q, buf.k, buf.v, buf.gate_up, buf.gate, buf.up
        norm = self._norm if b > 1 else None
        width, eps, row = x.shape[1], self.config.rms_norm_eps, buf.row
        torch.index_select(self.embed, 0, ids, out=x)
        # The rotary embedding as one product per layer: x @ (diag(cos) + swap @ diag(sin)).
        rotate = torch.diag_embed(self.cos[positions]) + self.swap * self.sin[positions][:, None, :]
        if put is not None:
            k_out, v_out = cache.k[put].unbind(0), cache.v[put].unbind(0)
        else:
            index_put = (torch.tensor(slots, device=self.device), slice(None), positions)
        if self.packed:  # packed layers, where their kernels for this batch size are not native

            def project(h: torch.Tensor, w: Any, out: torch.Tensor, alpha: float) -> None:
                torch.mul(w(h), alpha, out=out)

            def add(x: torch.Tensor, a: torch.Tensor, w: Any) -> None:
                x.copy_(w(a, residual=x))
        elif self.bf16:  # the torch path for bfloat16 weights (no C step here): float32 math, slower

            def project(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, alpha: float) -> None:
                torch.mul(bf16_linear(h, w), alpha, out=out)

            def add(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> None:
                x.copy_(bf16_linear(a, w, residual=x))
        else:

            def project(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, alpha: float) -> None:
                torch.addmm(zero, h, w, beta=0, alpha=alpha, out=out)

            def add(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> None:
                x.addmm_(a, w)

        # One sequence: RMSNorm(x) @ W == scale * ((x * weight) @ W), the scale going to addmm's alpha
        # (the norm written out here, not in a helper: every call made in this loop costs).
        for i, (norm1, qkv_w, o_w, norm2, gate_up_w, down_w) in enumerate(self.layers):
            if norm is None:
                torch.mul(x, norm1, out=h)
                scale = 1.0 / math.sqrt(float(torch.dot(row, row)) / width + eps)
            else:
                scale = norm(x, norm1, h)
            project(h, qkv_w, qkv, scale)
            torch.bmm(qk, rotate, out=roped)
            if put is not None:
                k_out[i].copy_(k)
                v_out[i].copy_(v)
            else:
                cache.k[i][index_put] = k
                cache.v[i][index_put] = v
            add(x, F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=mask).reshape(b, nq), o_w)
            if norm is None:
                torch.mul(x, norm2, out=h)
                scale = 1.0 / math.sqrt(float(torch.dot(row, row)) / width + eps)
            else:
                scale = norm(x, norm2, h)
            project(h, gate_up_w, gate_up, scale)
            add(x, F.silu(gate, inplace=True).mul_(up), down_w)
        scale = self._norm(x, self.norm, h)
        project(h, self.head, buf.logits, scale)
        return buf.logits

    def _chunk(self, x: torch.Tensor, b: int, t: int, positions: torch.Tensor, keys: Any, values: Any, cache: KVCache, put: tuple[Any, ...], mask: torch.Tensor | None) -> torch.Tensor:
        """Several tokens per sequence (a prompt): the same layers, without the single-token tricks."""
        n, d, nh, nkv, g = b * t, self.head_dim, self.n_heads, self.n_kv, self.group
        nqk, half, eps = (nh + nkv) * d, d // 2, self.config.rms_norm_eps
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        for i, (norm1, qkv_w, o_w, norm2, gate_up_w, down_w) in enumerate(self.layers):
            qkv = self._mm(F.rms_norm(x, self.width, norm1, eps), qkv_w)
            qk = qkv[:, :nqk].view(n, nh + nkv, d)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            cache.k[i][put] = qk[:, nh:].view(b, t, nkv, d)
            cache.v[i][put] = qkv[:, nqk:].view(b, t, nkv, d)
            q = qk[:, :nh].view(b, t, nkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, nkv, g * t, d)
            out = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=mask)
            x = self._addmm(x, out.view(b, nkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(n, nh * d), o_w)
            gate_up = self._mm(F.rms_norm(x, self.width, norm2, eps), gate_up_w)
            inter = gate_up.shape[1] // 2
            x = self._addmm(x, F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]), down_w)
        return x

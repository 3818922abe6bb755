"""One decoder for Gemma 3 text models and the Llama family, switched by `ModelConfig` flags.

Parameter names are the checkpoint's own (`model.layers.3.self_attn.q_proj.weight`), so loading is a
strict key-by-key copy (see `checkpoint.py`). The forward pass can

* return logits only at chosen positions (`logits_at`): a 262k vocabulary makes full logits the
  biggest cost of a short label, so training and scoring project only where they need to, and the
  last layer computes its outputs only there too (`outputs_at`, `positions.Selection`);
* attend to keys / values computed earlier (`cache`): generation appends to it, and a shared prompt
  prefix is computed once and attended to by every row of a batch (its batch dimension may be 1);
* skip padding: in a padded batch everything but attention runs on the real tokens only (`positions.Unpadded`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, RopeConfig
from .heads_op import from_heads, to_heads
from .lora_op import gated_activation
from .norm_op import rms_norm_op
from .positions import Selection, Unpadded
from .recompute import checkpoint_context


# ----------------------------------------------------------------------------------------- numerics


def rms_norm(x: Tensor, weight: Tensor, eps: float, unit_offset: bool) -> Tensor:
    """RMSNorm in fp32. Gemma: x_hat * (1 + w), multiplied before the cast back; Llama: w * cast(x_hat).
    One op with its own backward (norm_op.py)."""
    return rms_norm_op(x, weight, eps, unit_offset)[0]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool):
        super().__init__()
        # with the unit offset, w is stored zero-centred: zeros are the identity scale
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.unit_offset)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies (head_dim / 2,) with linear or llama3 scaling (Llama 3.1 paper, sec. 3)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_context = rope.original_max_position_embeddings
        low_freq_wavelen = old_context / rope.low_freq_factor
        high_freq_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(in_band, smoothed, scaled)
    return inv_freq


def _settle_first_transcendental_call() -> None:
    """In about one process in four (torch 2.13, CPU), the process's first cos / sin rounds some elements
    differently from every later call. RoPE's tables are the first such call of a run, so a run would not
    repeat bit for bit in another process (a resume included). One call on a throwaway tensor first
    settles it (benchmarks/NOTES.md, round 19)."""
    for dtype in (torch.float32, torch.float64):
        torch.zeros(64, dtype=dtype).cos_().sin_()


_settle_first_transcendental_call()


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos / sin of shape (*positions.shape, 1, head_dim) in the rotate-half layout of HF checkpoints:
    one row per token, broadcast over the heads of a (..., heads, head_dim) query or key."""
    freqs = positions.float()[..., None] * inv_freq  # (..., hd/2), fp32 for long contexts
    angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ------------------------------------------------------------------------------------------- cache


@dataclass
class KVCache:
    """Keys / values of earlier tokens, per layer. Immutable: a forward returns a new, longer cache.

    A batch dimension of 1 is broadcast over the batch, which is how a shared prompt prefix is reused.
    """

    layers: list[tuple[Tensor, Tensor]]  # per layer: (B or 1, n_kv, S, head_dim) keys and values
    positions: Tensor  # (B or 1, S) position id of each cached key
    valid: Tensor  # (B or 1, S) False at padding

    @property
    def length(self) -> int:
        return self.positions.shape[1]


@dataclass
class DecoderOutput:
    logits: Tensor | None  # (B, T, V), (B, V) for "last", (N, V) for a position selection, None for "none"
    hidden: Tensor  # (B, T, H) final-normed hidden states (meaningless at padding); (N, H) with outputs_at
    cache: KVCache | None  # only when use_cache=True


# ------------------------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else cfg.head_dim**-0.5
        self.softcap = cfg.attn_logit_softcap
        self.layer_type = layer_type

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, past: tuple[Tensor, Tensor] | None,
        unpadded: Unpadded | None = None, selection: Selection | None = None, regather_output: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """selection: queries only for those tokens (`mask` is then over its query grid); returns (M, hidden).
        regather_output (only outside gradient checkpointing, whose own saved-tensor hooks it would
        override): o_proj's backward gathers its input from attention's kept output again."""
        tokens = x.shape[:-1]  # (B, T), or (N,) when unpadded
        k = _token_rows(self.k_proj(x), self.num_kv_heads, self.head_dim)
        v = _token_rows(self.v_proj(x), self.num_kv_heads, self.head_dim)
        if selection is None:
            q, q_cos, q_sin = _token_rows(self.q_proj(x), self.num_heads, self.head_dim), cos, sin
        else:
            rows = selection.rows
            q = _token_rows(self.q_proj(x.reshape(-1, x.shape[-1])[rows]), self.num_heads, self.head_dim)
            q_cos, q_sin = (_token_rows(c, 1, self.head_dim)[rows] for c in (cos, sin))
        if self.qk_norm:  # Gemma 3 normalises q and k over head_dim before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE and the move to (B, heads, T, hd), zeros at padding, as one op each (heads_op.py)
        layout = (None, *tokens) if unpadded is None else unpadded.layout
        query_layout = layout if selection is None else selection.grid.layout
        k = to_heads(k, _token_rows(cos, 1, self.head_dim), _token_rows(sin, 1, self.head_dim), *layout)
        v = to_heads(v, None, None, *layout)
        q = to_heads(q, _token_rows(q_cos, 1, self.head_dim), _token_rows(q_sin, 1, self.head_dim), *query_layout)
        batch = k.shape[0]
        if past is not None:
            past_k, past_v = past
            k = torch.cat((past_k.expand(batch, -1, -1, -1), k), dim=2)  # (B, n_kv, S + T, hd)
            v = torch.cat((past_v.expand(batch, -1, -1, -1), v), dim=2)
        present = (k, v)
        grouped = self.num_kv_heads != self.num_heads  # grouped-query attention
        if self.softcap is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=grouped
            )
        else:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = _softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        query_index = query_layout[0]
        if query_index is None:  # (B, heads, T, hd) -> (B, T, hidden)
            return self.o_proj(out.transpose(1, 2).reshape(*tokens, self.num_heads * self.head_dim)), present
        rows = from_heads(out, query_index)  # (N or M, hidden)
        # SDPA keeps `out` for its backward: o_proj's backward gathers its input from it again rather
        # than keeping the same values twice (one hidden-wide row per token and layer)
        with _saved_as_recomputed(rows, partial(from_heads, out, query_index),
                                  enabled=regather_output and self.softcap is None):
            return self.o_proj(rows), present


@contextmanager
def _saved_as_recomputed(tensor: Tensor, recompute: Callable[[], Tensor], enabled: bool = True):
    """Within it, autograd keeps `recompute` in place of `tensor`, and calls it once, when backward first
    needs the tensor, however many ops kept it (q, k and v keep the same input). A no-op where
    `enabled` is False or autograd keeps nothing (grad mode off)."""
    if not (enabled and torch.is_grad_enabled()):
        yield
        return
    layout = (tensor.data_ptr(), tensor.shape, tensor.stride())
    recomputed: list[Tensor] = []  # lives as long as some op still holds the recipe

    def recipe() -> Tensor:
        if not recomputed:
            recomputed.append(recompute())
        return recomputed[0]

    def pack(saved: Tensor):
        return recipe if (saved.data_ptr(), saved.shape, saved.stride()) == layout else saved

    def unpack(packed):
        return packed() if callable(packed) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _token_rows(t: Tensor, heads: int, head_dim: int) -> Tensor:
    """(..., heads * head_dim), one row per token -> (N, heads, head_dim); RoPE's cos / sin as heads = 1."""
    return t.reshape(-1, heads, head_dim)


def soft_cap(x: Tensor, cap: float, in_place: bool = False) -> Tensor:
    """cap * tanh(x / cap) (Gemma 2's attention and final-logit soft-capping). In place only on a tensor
    autograd does not track: tanh's backward reads its output, which the last multiply would overwrite."""
    return x.div_(cap).tanh_().mul_(cap) if in_place else torch.tanh(x / cap) * cap


def _softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, cap: float) -> Tensor:
    """Explicit attention for configs with tanh soft-capping of the scores (not expressible in SDPA)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = soft_cap(scores, cap)
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU for Llama, GeGLU (tanh GELU) for Gemma."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gelu = cfg.mlp_activation == "gelu_tanh"

    def forward(self, x: Tensor, recompute_product: bool = False) -> Tensor:
        """recompute_product: backward recomputes act(gate) * up instead of keeping it and act(gate)
        (needs `recomputes_product()`)."""
        gate, up = self.gate_proj(x), self.up_proj(x)
        if recompute_product:
            return self.down_proj.gated_forward(gate, up, self.gelu)
        return self.down_proj(gated_activation(gate, self.gelu) * up)

    def recomputes_product(self) -> bool:
        """Whether the down projection takes (gate, up) in one op that recomputes their product in
        backward (`lora.LoRALinear.gated_forward`: an adapter on a dense base)."""
        fuses = getattr(self.down_proj, "fuses_gated_product", None)
        return fuses is not None and fuses()


class DecoderLayer(nn.Module):
    """Pre-norm block. Llama's `post_attention_layernorm` is the norm *before* the MLP; with sandwich
    norms (Gemma 2/3) it normalises the attention output, and two more norms wrap the MLP."""

    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)  # noqa: E731
        self.self_attn = Attention(cfg, layer_type)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, past: tuple[Tensor, Tensor] | None,
        unpadded: Unpadded | None = None, selection: Selection | None = None,
        feed_forward_context: Callable | None = None, recompute_mlp_product: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The "mlp" policy (recompute.py): recompute_mlp_product has the MLP's backward recompute its
        gated product; feed_forward_context, where it cannot, checkpoints the feed-forward half with this
        `context_fn`. Attention runs outside any checkpoint in both cases and keeps its activations, but
        for its output rows, gathered again in backward, and its normed input, normed again in backward."""
        mlp_policy = recompute_mlp_product or feed_forward_context is not None
        normed = self.input_layernorm(x)
        # q, k and v keep their input for their adapters' gradients; the norm keeps x and its (N, 1)
        # scale already, so one norm in backward replaces a hidden-wide row per token and layer
        with _saved_as_recomputed(normed, partial(self.input_layernorm, x), enabled=mlp_policy):
            attn_out, present = self.self_attn(normed, cos, sin, mask, past, unpadded, selection,
                                               regather_output=mlp_policy)
        if selection is not None:  # from here on the residual stream is needed at the selected tokens only
            x = x.reshape(-1, x.shape[-1])[selection.rows]
        x = x + (self.post_attention_layernorm(attn_out) if self.sandwich else attn_out)
        if feed_forward_context is None:
            return x + self.feed_forward(x, recompute_mlp_product), present
        return x + checkpoint(self.feed_forward, x, use_reentrant=False, context_fn=feed_forward_context,
                              preserve_rng_state=True), present

    def feed_forward(self, x: Tensor, recompute_mlp_product: bool = False) -> Tensor:
        """The MLP with its norms: Llama's `post_attention_layernorm` before it, Gemma's two around it.
        With recompute_mlp_product, gate and up's input is normed again in backward, as in `forward`."""
        norm = self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm
        normed = norm(x)
        with _saved_as_recomputed(normed, partial(norm, x), enabled=recompute_mlp_product):
            out = self.mlp(normed, recompute_mlp_product)
        return self.post_feedforward_layernorm(out) if self.sandwich else out


# ------------------------------------------------------------------------------------------- masks


def build_attention_mask(
    query_positions: Tensor, key_positions: Tensor, key_valid: Tensor, window: int | None
) -> Tensor:
    """Boolean mask (B, 1, T, S), True where query i may attend to key j: causal by position id,
    inside the sliding window (i - window < j) and not padding. A query that sees no key (a padding
    query under left padding, an unused slot of a `Selection` grid) is allowed to see itself (the
    i-th of the last T keys, or the first key when there are more queries than keys) so SDPA never
    produces NaN rows."""
    q_pos, k_pos = query_positions[:, :, None], key_positions[:, None, :]
    allowed = (k_pos <= q_pos) & key_valid[:, None, :]
    if window is not None:
        allowed &= k_pos > q_pos - window
    empty_rows = ~allowed.any(-1, keepdim=True)
    if bool(empty_rows.any()):
        length, keys = query_positions.shape[1], key_positions.shape[1]
        own = (torch.arange(length, device=allowed.device) + keys - length).clamp(min=0)
        own_key = torch.arange(keys, device=allowed.device)[None, :] == own[:, None]  # (T, S)
        allowed |= empty_rows & own_key
    return allowed[:, None]


def _is_right_padded(mask: Tensor) -> bool:
    """True when every row is 1...1 0...0, so a plain causal mask is exact for the real tokens."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


# -------------------------------------------------------------------------------------------- model


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm: checkpoint names under `model.`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # drawn only off the meta device: on "meta" (a model built to load into) torch's normal_
        # imports torch._dynamo and sympy, 1 s and 70 MB for nothing
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        if not weight.is_meta:
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kind) for kind in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)


class CausalLM(nn.Module):
    """Decoder-only language model. `forward` is the single entry point for training, scoring and
    generation; `gradient_checkpointing` recomputes each block in backward (non-reentrant), keeping
    what `checkpoint_policy` says (see `recompute.py`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.checkpoint_policy = "full"  # or "selective" / "mlp" (recompute.CHECKPOINT_POLICIES)
        self._inv_freq: dict[tuple[str, torch.device], Tensor] = {}

    # --- helpers ---------------------------------------------------------------------------------

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _rope(self, kind: str, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        rope = self.config.rope_local if kind == "sliding_attention" else self.config.rope_global
        key = (kind, positions.device)
        if key not in self._inv_freq:  # not a buffer: survives meta-device construction and .to()
            self._inv_freq[key] = rope_inverse_frequencies(rope, self.config.head_dim, positions.device)
        return rope_cos_sin(self._inv_freq[key], positions, dtype)

    def embed(self, input_ids: Tensor) -> Tensor:
        h = self.model.embed_tokens(input_ids)
        if self.config.embed_scale != 1.0:  # scale cast to the activation dtype first, as Gemma does
            h = h * torch.tensor(self.config.embed_scale, dtype=h.dtype)
        return h

    def project(self, hidden: Tensor) -> Tensor:
        """LM head (+ final soft-capping); call it only on the positions whose logits you need."""
        logits = self.lm_head(hidden)
        if self.config.final_logit_softcap is not None:
            logits = soft_cap(logits, self.config.final_logit_softcap)
        return logits

    # --- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        use_cache: bool = False,
        logits_at: str | Tensor = "all",
        recompute: bool | None = None,
        unpad: bool = True,
        outputs_at: Tensor | None = None,
    ) -> DecoderOutput:
        """input_ids (B, T); attention_mask (B, T) 1 for real tokens; position ids default to the
        count of real tokens before each one (so left padding does not shift positions).

        logits_at: "all" -> (B, T, V); "last" -> (B, V); "none" -> no LM head;
        a bool (B, T) mask or an index tensor over the flattened (B*T) positions -> (N, V), the same as
        outputs_at=that, logits_at="all".
        outputs_at: the positions (same forms) whose outputs are needed: the last layer runs only there
        (see `positions.Selection`); hidden is then (N, H) and logits_at="all" gives (N, V). Real tokens only.
        recompute: gradient checkpointing for this call (None: `self.gradient_checkpointing`).
        unpad: run everything but attention on the real tokens only (see `positions.Unpadded`); False computes
        the padding positions too (same results at the real tokens).
        """
        if isinstance(logits_at, Tensor):  # logits at chosen positions: compute only those outputs
            if outputs_at is not None:
                raise ValueError("positions go in logits_at or in outputs_at, not both")
            outputs_at, logits_at = logits_at, "all"
        if outputs_at is not None and logits_at == "last":
            raise ValueError("logits_at='last' needs every position's output; with outputs_at use 'all' or 'none'")
        batch, length = input_ids.shape
        device = input_ids.device
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if position_ids is None:
            start = cache.positions.max(dim=1, keepdim=True).values + 1 if cache is not None else 0
            position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0) + start
        position_ids = position_ids.expand(batch, -1)

        padded = attention_mask is not None and not bool(valid.all())  # the one host sync for both uses
        key_positions, key_valid = self._keys(position_ids, valid, cache)
        masks = self._masks(position_ids, valid, key_positions, key_valid, cache is None, padded)
        unpadded = Unpadded.of(valid) if unpad and padded else None
        if unpadded is None:
            h, token_positions = self.embed(input_ids), position_ids
        else:
            h, token_positions = self.embed(unpadded.gather(input_ids)), unpadded.gather(position_ids)
        ropes = {kind: self._rope(kind, token_positions, h.dtype) for kind in set(self.config.layer_types)}
        selection = selection_mask = None
        if outputs_at is not None:
            selection = Selection.of(outputs_at.to(device), position_ids, valid, unpadded)
            window = self.config.sliding_window if self.config.layer_types[-1] == "sliding_attention" else None
            selection_mask = build_attention_mask(selection.query_positions, key_positions, key_valid, window)
        last = len(self.model.layers) - 1
        recompute = self.gradient_checkpointing if recompute is None else recompute
        checkpointing = recompute and self.training and torch.is_grad_enabled()
        context_fn = checkpoint_context(self.checkpoint_policy) if checkpointing else None
        presents = []
        for index, layer in enumerate(self.model.layers):
            kind = self.config.layer_types[index]
            cos, sin = ropes[kind]
            past = cache.layers[index] if cache is not None else None
            chosen = selection if index == last else None
            mask = selection_mask if chosen is not None else masks[kind]
            if checkpointing and self.checkpoint_policy == "mlp":
                if layer.mlp.recomputes_product():
                    h, present = layer(h, cos, sin, mask, past, unpadded, chosen, recompute_mlp_product=True)
                else:  # e.g. an NF4 or unadapted down projection
                    h, present = layer(h, cos, sin, mask, past, unpadded, chosen, feed_forward_context=context_fn)
            elif checkpointing:
                h, present = checkpoint(  # the RNG restore replays the same dropout masks ("full")
                    layer, h, cos, sin, mask, past, unpadded, chosen,
                    use_reentrant=False, context_fn=context_fn, preserve_rng_state=True,
                )
            else:
                h, present = layer(h, cos, sin, mask, past, unpadded, chosen)
            presents.append(present)
        h = self.model.norm(h)
        if unpadded is not None and selection is None:
            h = unpadded.scatter(h)

        new_cache = None
        if use_cache:
            old_pos = cache.positions.expand(batch, -1) if cache is not None else position_ids[:, :0]
            old_valid = cache.valid.expand(batch, -1) if cache is not None else valid[:, :0]
            new_cache = KVCache(
                presents, torch.cat((old_pos, position_ids), dim=1), torch.cat((old_valid, valid), dim=1)
            )
        return DecoderOutput(self._logits(h, logits_at), h, new_cache)

    def _logits(self, h: Tensor, logits_at: str) -> Tensor | None:
        if logits_at == "all":
            return self.project(h)
        if logits_at == "last":
            return self.project(h[:, -1])
        if logits_at == "none":
            return None
        raise ValueError(f"logits_at={logits_at!r}: expected 'all', 'last', 'none' or a position tensor")

    def _keys(self, positions: Tensor, valid: Tensor, cache: KVCache | None) -> tuple[Tensor, Tensor]:
        """Position ids and validity (B, S) of every key a query attends over: the cache's, then these."""
        if cache is None:
            return positions, valid
        batch = positions.shape[0]
        return (torch.cat((cache.positions.expand(batch, -1), positions), dim=1),
                torch.cat((cache.valid.expand(batch, -1), valid), dim=1))

    def _masks(
        self, positions: Tensor, valid: Tensor, key_pos: Tensor, key_valid: Tensor, no_cache: bool, padded: bool
    ) -> dict[str, Tensor | None]:
        """One mask per layer kind, or None where SDPA's built-in causal mask is exact (the fast path:
        no cache, right padding only, sequence inside the sliding window)."""
        length = positions.shape[1]
        window = self.config.sliding_window
        plain_causal = no_cache and (not padded or _is_right_padded(valid))
        masks: dict[str, Tensor | None] = {}
        for kind in set(self.config.layer_types):
            kind_window = window if kind == "sliding_attention" else None
            if plain_causal and (kind_window is None or length <= kind_window):
                masks[kind] = None
            else:
                masks[kind] = build_attention_mask(positions, key_pos, key_valid, kind_window)
        return masks



def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (a tied lm_head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())

"""Int8 inference (W8A8): every decoder projection as one int8 x int8 -> int32 product.

For evaluation only, and opt-in (`eval.py --int8`). Where the CPU has int8 dot-product instructions
(AVX512-VNNI, AMX), `torch._int_mm` runs ~4x the fp32 matmul rate, and `score` 1.6-1.8x faster than
in fp32 on the two packaged models, with 1.6 % (Gemma 3 270M) and 4 % (SmolLM2) of the test rows
predicted differently and accuracy within 0.4 points (benchmarks/NOTES.md round 18). Without those
instructions (AVX2 alone) `_int_mm` runs near the fp32 rate and int8 only adds work. fp32 stays the
default everywhere.

* Weights: each projection's effective weight (base + adapter update, NF4 dequantized) in int8, one
  scale per output channel.
* Activations: int8 with one scale per token (row), computed at run time: a per-tensor scale lets
  one outlier token flatten every other token to a few levels.
* SmoothQuant (Xiao et al. 2023, arXiv:2211.10438): a few input channels carry outliers 10-100x the
  rest in every token. Dividing input channel j by s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)
  and multiplying weight column j by it leaves the product unchanged in exact arithmetic and moves
  the outliers' range into the weights, which are quantized per row. max|X_j| comes from one fp32
  pass over a few calibration rows (`calibrate`).
* Projections that read the same tensor (q / k / v, gate / up) share one smoothing and one
  quantized input (`SharedInput`), found in the calibration pass by tensor identity.

The LM head (`Int8Head`) keeps the logits that are read in fp32 (the label tokens, `model.project`);
only its bulk, the log-sum-exp over the whole vocabulary that normalises the first label token, runs
in int8. So the head never changes which label wins: that normaliser is the same for every label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .head_loss import log_sum_exp_by_chunks
from .lora import LoRALinear
from .lora_op import gated_activation
from .model import soft_cap
from .quant import NF4Linear

DEFAULT_ALPHA = 0.65  # migration strength; of 0, 0.5, 0.65, 0.8, 0.9 it agreed best with fp32 (NOTES round 18)


def smoothing_factors(input_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-input-channel s (in,): max|X_j| ** alpha / max_i |W_ij| ** (1 - alpha)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], found {alpha}")
    weight_absmax = weight.abs().amax(0).clamp_min(1e-5)
    return (input_absmax.clamp_min(1e-5) ** alpha / weight_absmax ** (1 - alpha)).clamp_min(1e-5)


def quantize_rows(x: Tensor, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per row: (M, K) -> codes (M, K) int8, scales (M, 1) fp32,
    x ~= codes * scales. in_place: x (fp32) is scratch, overwritten."""
    x = x.float()
    absmax = torch.maximum(x.amax(1, keepdim=True), -x.amin(1, keepdim=True)).clamp_min_(1e-12)  # (M, 1)
    scaled = x.mul_(127.0 / absmax) if in_place else x * (127.0 / absmax)
    codes = scaled.round_().to(torch.int8)  # |x| / absmax <= 1: no clamp needed
    return codes, absmax.mul_(1 / 127.0)


def int8_product(codes: Tensor, weight_codes_t: Tensor) -> Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32, exact. CUDA's kernel needs M > 16: pad rows there."""
    rows = codes.shape[0]
    if codes.is_cuda and rows <= 16:
        codes = torch.cat((codes, codes.new_zeros(17 - rows, codes.shape[1])))
    return torch._int_mm(codes, weight_codes_t)[:rows]


class SharedInput:
    """The smoothed, quantized form of one input tensor, computed once for all projections that read it.

    Holds the last input it quantized (not only its address: a freed tensor's memory is reused by the
    next batch's tensor of the same shape), so a sibling projection's call on the same tensor is free."""

    def __init__(self, inverse_smoothing: Tensor | None):
        self.inverse_smoothing = inverse_smoothing  # (in,) 1 / s, or None without smoothing
        self._source: Tensor | None = None
        self._quantized: tuple[Tensor, Tensor] | None = None

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x is not self._source:
            rows = x.reshape(-1, x.shape[-1]).float()
            smoothed = self.inverse_smoothing is not None
            if smoothed:
                rows = rows * self.inverse_smoothing
            self._source, self._quantized = x, quantize_rows(rows, in_place=smoothed)
        return self._quantized

    def release(self) -> None:
        self._source = self._quantized = None


class Int8Linear(nn.Module):
    """y = x W^T + b with W (out, in) in int8 per output channel and x in int8 per token; fp32 scales
    and accumulation in int32. `smoothing` (in,): W's columns are multiplied by it and `shared` divides
    the input by it."""

    def __init__(self, weight: Tensor, bias: Tensor | None, shared: SharedInput, smoothing: Tensor | None = None):
        super().__init__()
        weight = weight.detach().float()
        if weight.is_cuda and (weight.shape[0] % 8 or weight.shape[1] % 8):
            raise ValueError(f"int8 on CUDA: torch._int_mm needs in and out features divisible by 8, "
                             f"found a weight of shape {tuple(weight.shape)}")
        if smoothing is not None:
            weight = weight * smoothing
        codes, scales = quantize_rows(weight)  # (out, in), (out, 1)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_codes", codes, persistent=False)
        self.register_buffer("weight_scales", scales.reshape(-1), persistent=False)  # (out,)
        self.bias = None if bias is None else bias.detach().float()
        self.shared = shared

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out) in x's dtype
        codes, row_scales = self.shared.quantize(x)
        out = int8_product(codes, self.weight_codes.t()).float().mul_(row_scales).mul_(self.weight_scales)
        if self.bias is not None:
            out.add_(self.bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8GatedMLP(nn.Module):
    """model.MLP, down(act(gate(x)) * up(x)), from three bias-free `Int8Linear`s, in two passes over the
    (tokens, intermediate) activations fewer than running them one by one: up's output is not scaled by
    its per-token factor (the per-token quantization of down's input absorbs any per-row factor, and
    down's output takes it back), and down's smoothing rides on up's per-channel scales."""

    def __init__(self, gate: Int8Linear, up: Int8Linear, down: Int8Linear, gelu: bool):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.gelu = gate, up, down, gelu
        smoothing = down.shared.inverse_smoothing
        self.up_scales = up.weight_scales if smoothing is None else up.weight_scales * smoothing  # (intermediate,)

    def forward(self, x: Tensor, recompute_product: bool = False) -> Tensor:
        codes, row_scales = self.gate_proj.shared.quantize(x)
        gate = int8_product(codes, self.gate_proj.weight_codes.t()).float()
        gate = gated_activation(gate.mul_(row_scales).mul_(self.gate_proj.weight_scales), self.gelu, in_place=True)
        up = int8_product(codes, self.up_proj.weight_codes.t()).float().mul_(self.up_scales)
        product_codes, product_scales = quantize_rows(gate.mul_(up), in_place=True)  # act(gate) * up / s / rows
        out = int8_product(product_codes, self.down_proj.weight_codes.t()).float()
        out = out.mul_(product_scales.mul_(row_scales)).mul_(self.down_proj.weight_scales)
        return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


class Int8Head(nn.Module):
    """A bias-free LM head inside `int8_for_inference`: `forward` is the fp32 original (exact logits
    wherever they are read); `log_sum_exp` is log sum_v exp(logit_v) over the vocabulary (soft-capped
    where the model caps), with the logits from int8 codes of the weight (per vocabulary row) and of
    the hidden states (per row)."""

    def __init__(self, head: nn.Linear, softcap: float | None):
        super().__init__()
        self.weight = head.weight  # the same (tied) parameter, not a copy
        self.bias = None
        self.softcap = softcap
        pieces = [quantize_rows(piece) for piece in head.weight.detach().split(65536)]  # bounded scratch
        self.register_buffer("weight_codes", torch.cat([codes for codes, _ in pieces]), persistent=False)
        self.register_buffer("weight_scales", torch.cat([scales for _, scales in pieces]).reshape(-1),
                             persistent=False)  # (V,)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight)

    def log_sum_exp(self, hidden: Tensor) -> Tensor:  # (N, H) -> (N,) fp32
        codes, row_scales = quantize_rows(hidden)

        def chunk_logits(start: int, end: int) -> Tensor:
            logits = int8_product(codes, self.weight_codes[start:end].t()).float()
            logits.mul_(row_scales).mul_(self.weight_scales[start:end])
            return logits if self.softcap is None else soft_cap(logits, self.softcap, in_place=True)

        return log_sum_exp_by_chunks(chunk_logits, self.weight_codes.shape[0], hidden)


def effective_weight(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The (out, in) fp32 weight and the bias a projection applies, adapter included (as it runs now:
    nothing added when its adapter is disabled or already merged)."""
    if isinstance(layer, LoRALinear):
        weight, bias = effective_weight(layer.base_layer)
        if not (layer.merged or layer.disabled):
            with torch.no_grad():
                weight = layer.merged_weight(weight)
        return weight, bias
    if isinstance(layer, NF4Linear):
        return layer.dequantize().float(), layer.bias
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float(), layer.bias
    raise TypeError(f"effective_weight: not a projection: {type(layer).__name__}")


def decoder_projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every projection in the decoder layers: adapter-wrapped ones as a whole, the
    LM head and the adapters' own A / B left out."""
    found: list[tuple[str, nn.Module]] = []
    inside_adapter: list[str] = []
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if any(name.startswith(prefix + ".") for prefix in inside_adapter):
            continue
        if isinstance(module, LoRALinear):
            inside_adapter.append(name)
            found.append((name, module))
        elif isinstance(module, (nn.Linear, NF4Linear)):
            found.append((name, module))
    return found


def calibrate(model: nn.Module, run: Callable[[], object]) -> tuple[dict[str, Tensor], list[list[str]]]:
    """Run `run()` (fp32 forwards over calibration rows) and record, per projection, the largest |x_j|
    of each input channel, and which projections read the same tensor (groups in call order)."""
    absmax: dict[str, Tensor] = {}
    group_of: dict[str, int] = {}
    groups: list[list[str]] = []
    last_input: list[Tensor | None] = [None]

    def hook(name: str):
        def record(module, args, output):
            x = args[0]
            if name not in group_of:
                if x is not last_input[0] or not groups:
                    groups.append([])
                groups[-1].append(name)
                group_of[name] = len(groups) - 1
            last_input[0] = x
            seen = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
            absmax[name] = seen if name not in absmax else torch.maximum(absmax[name], seen)
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in decoder_projections(model)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return absmax, groups


@contextmanager
def int8_for_inference(model: nn.Module, run_calibration: Callable[[], object],
                       alpha: float = DEFAULT_ALPHA) -> Iterator[nn.Module]:
    """Inside the block every decoder projection runs as `Int8Linear` (each gated MLP as one
    `Int8GatedMLP`) and a plain LM head as `Int8Head`; inference only (no_grad). On exit the original
    modules are back, untouched. `run_calibration` runs the fp32 model over a few rows (e.g.
    `lambda: label_logprobs(model, formatter, texts)`) to measure the inputs' ranges."""
    projections = dict(decoder_projections(model))
    absmax, groups = calibrate(model, run_calibration)
    head = model.lm_head
    missing = [name for name in projections if name not in absmax]
    groups += [[name] for name in missing]  # never called in calibration: its own group, no smoothing
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    shared_inputs: list[SharedInput] = []
    try:
        with torch.no_grad():
            for group in groups:
                weights = {name: effective_weight(projections[name]) for name in group}
                seen = [absmax[name] for name in group if name in absmax]
                smoothing = None
                if seen and alpha > 0:  # one s for all the group's readers
                    combined = torch.cat([weights[name][0] for name in group])
                    smoothing = smoothing_factors(torch.stack(seen).amax(0).to(combined.device), combined, alpha)
                shared = SharedInput(None if smoothing is None else 1.0 / smoothing)
                shared_inputs.append(shared)
                for name in group:
                    parent_name, _, attr = name.rpartition(".")
                    parent = model.get_submodule(parent_name)
                    weight, bias = weights[name]
                    swapped.append((parent, attr, projections[name]))
                    setattr(parent, attr, Int8Linear(weight, bias, shared, smoothing))
            for layer in model.model.layers:
                mlp = layer.mlp
                parts = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                if (all(isinstance(p, Int8Linear) and p.bias is None for p in parts)
                        and mlp.gate_proj.shared is mlp.up_proj.shared):
                    swapped.append((layer, "mlp", mlp))
                    layer.mlp = Int8GatedMLP(*parts, gelu=mlp.gelu)
            if type(head) is nn.Linear and head.bias is None:  # not an adapter on the head
                model.lm_head = Int8Head(head, model.config.final_logit_softcap)
            yield model
    finally:
        model.lm_head = head
        for parent, attr, original in swapped:
            setattr(parent, attr, original)
        for shared in shared_inputs:
            shared.release()

"""LoRA and DoRA adapters injected into any nn.Module tree by module name.

LoRA (Hu et al. 2021, arXiv:2106.09685) learns a low-rank update of a frozen linear layer:

    y = base(x) + scale * B(A(dropout(x)))        A: (r, in), B: (out, r), scale = alpha / r

A is Kaiming-uniform (a = sqrt(5), as loralib / peft), B is zero, so a fresh adapter is the identity.
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) uses scale = alpha / sqrt(r).
DoRA (Liu et al. 2024, arXiv:2402.09353) adds a learned per-output magnitude; see `DoRALinear`.

Layout follows peft so state-dict names line up with its files: a wrapped projection keeps the frozen
layer as the child `base_layer` (`...q_proj.base_layer.weight`), next to `lora_A.weight`,
`lora_B.weight` and, for DoRA, `lora_magnitude_vector`. LoRA parameters are fp32 whatever the base
dtype. Weights change only through explicit calls (`merge_adapters`, `unmerge_adapters`), never as a
side effect of `.eval()`; `merged_for_inference` runs merged copies for a block and puts the originals back.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora_op import gated_lora_linear, lora_linear
from .quant import NF4Linear
from .recompute import dropout_drops, dropout_mask

# never adapted unless named explicitly: adapters on the LM head or embeddings do not load in vLLM /
# llama.cpp
DEFAULT_EXCLUDED = ("lm_head",)


@dataclass
class LoraConfig:
    """Which layers get adapters and how they are shaped."""

    r: int = 16  # rank of the update B @ A
    alpha: float = 32  # scale numerator: scale = alpha / r (or alpha / sqrt(r) with rsLoRA)
    dropout: float = 0.05  # dropout on the adapter input only; the base path sees the clean x
    target_modules: list[str] | str = field(  # module-name suffixes, a regex (full match), or "all-linear"
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r) (arXiv:2312.03732)
    variant: str = "lora"  # a key of ADAPTER_VARIANTS: "lora" or "dora"


def base_weight(layer: nn.Module) -> Tensor:
    """The (out, in) weight of an nn.Linear, or the dequantized weight of an NF4Linear."""
    return layer.dequantize() if isinstance(layer, NF4Linear) else layer.weight


def _base_device(layer: nn.Module) -> torch.device:
    return layer.weight_nf4.device if isinstance(layer, NF4Linear) else layer.weight.device


class FastDropout(nn.Dropout):
    """nn.Dropout with the mask from `recompute.dropout_mask`: faster on CPU, and replayed exactly
    when gradient checkpointing recomputes a block."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return x * dropout_mask(x.shape, self.p, x.device, x.dtype)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    A variant is one subclass: it overrides `adapter_output` (the term added to the base output) and
    `merged_weight` / `unmerged_weight` (the same map applied to the base weight), plus `__init__` for
    any extra parameter (see `DoRALinear`), and one `ADAPTER_VARIANTS` entry. Every parameter outside
    `base_layer` is trained, saved and loaded; load_adapter reads their shapes off one instance built on
    the meta device, so `__init__` must not read a tensor's values (`.item()`, `.tolist()`).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = _base_device(base_layer)
        # fp32 whatever the base dtype: bf16 adapters lose small updates to rounding
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = FastDropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while the update lives inside base_layer.weight
        self.disabled = False  # set by `disable_adapters`
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform with a = sqrt(5) (loralib / peft), B zero: a fresh adapter changes nothing."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """scale * B @ A, (out, in) in fp32."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: Tensor) -> Tensor:  # x: (..., in) -> (..., out)
        if self._runs_as_one_op():
            drops, p = self._dropout_drops(x)
            return lora_linear(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, drops, p,
                               self.scale)[0]
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        x = x.to(self.lora_A.weight.dtype)
        return (result + self.adapter_output(x, result)).to(result.dtype)

    def gated_forward(self, gate: Tensor, up: Tensor, gelu: bool) -> Tensor:
        """self(act(gate) * up) for the gated MLP's down projection, as `lora_op.gated_lora_linear`: its
        backward recomputes the product instead of keeping it (see `fuses_gated_product`)."""
        if not self.fuses_gated_product():
            raise RuntimeError(f"gated_forward: this {type(self).__name__} does not run as one op "
                               f"(base {type(self.base_layer).__name__}, merged={self.merged}); "
                               "call it on act(gate) * up instead")
        drops, p = self._dropout_drops(gate)
        return gated_lora_linear(gate, up, gelu, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight,
                                 drops, p, self.scale)[0]

    def adapter_output(self, x: Tensor, base_result: Tensor) -> Tensor:
        """The term added to the base output; x is already fp32."""
        return self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scale)  # scale the r-wide product

    def fuses_gated_product(self) -> bool:
        """Whether `gated_forward` applies: wherever `forward` runs as one op."""
        return self._runs_as_one_op()

    def _runs_as_one_op(self) -> bool:
        """Plain LoRA on a dense, bias-free base runs as `lora_op.lora_linear` (same result, fewer
        recomputed products under checkpointing); variants that change `adapter_output` never do."""
        return (type(self).adapter_output is LoRALinear.adapter_output and not (self.merged or self.disabled)
                and type(self.base_layer) is nn.Linear and self.base_layer.bias is None
                and not self.base_layer.weight.requires_grad)

    def merges_exactly(self) -> bool:
        """Whether `merged_weight` can go into a copy of the base weight with nothing lost but fp32
        rounding: a dense, frozen fp32 base (NF4 would be re-quantized, bf16 / fp16 would round the
        update). A variant whose merge is not exact overrides this."""
        base = self.base_layer
        return type(base) is nn.Linear and base.weight.dtype == torch.float32 and not base.weight.requires_grad

    def _dropout_drops(self, x: Tensor) -> tuple[Tensor | None, float]:
        if not self.training or not isinstance(self.lora_dropout, FastDropout):
            return None, 0.0
        return dropout_drops(x.shape, self.lora_dropout.p, x.device), self.lora_dropout.p

    def merged_weight(self, weight: Tensor) -> Tensor:
        """The base weight with the update folded in (fp32 in, fp32 out)."""
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        """Inverse of `merged_weight`."""
        return weight - self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into base_layer.weight (full-precision bases only)."""
        if self.merged:
            raise RuntimeError("merge(): this adapter is already merged")
        weight = self._full_precision_weight("merge")
        weight.copy_(self.merged_weight(weight.float()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of base_layer.weight (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("unmerge(): this adapter is not merged")
        weight = self._full_precision_weight("unmerge")
        weight.copy_(self.unmerged_weight(weight.float()).to(weight.dtype))
        self.merged = False

    def _full_precision_weight(self, what: str) -> Tensor:
        if isinstance(self.base_layer, NF4Linear):
            # merging into NF4 would re-quantize and lose the update; merging into the bf16 original
            # shifts outputs (the adapter was trained against the dequantized weights)
            raise TypeError(
                f"{what}(): the base layer is NF4-quantized. Call minilora.quant.dequantize_nf4(model) first so "
                "the update is merged onto the dequantized weights it was trained against, or use "
                "minilora.adapter_io.export_merged, which does both."
            )
        return self.base_layer.weight

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353), numerically as peft's DoRA.

        W' = m * (W + scale * B @ A) / ||W + scale * B @ A||_row        m: (out,), init ||W||_row

    The norm is detached (paper sec. 4.3): it follows the update but gets no gradient.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(self.delta_weight()))  # (out,)
        self._merge_norm: Tensor | None = None  # the norm used by merge(), needed again by unmerge()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        super().reset_lora_parameters()
        if hasattr(self, "lora_magnitude_vector"):
            self.lora_magnitude_vector.copy_(self.weight_norm(self.delta_weight()))

    def weight_norm(self, delta: Tensor) -> Tensor:
        """||W + delta|| over each output row, (out,), fp32, detached."""
        weight = base_weight(self.base_layer).detach().float()  # (out, in)
        return torch.linalg.norm(weight + delta.detach(), dim=1).detach()

    def adapter_output(self, x: Tensor, base_result: Tensor) -> Tensor:
        # (m / ||W + dW|| - 1) * W x + (m / ||W + dW||) * scale * B A x
        # == m / ||W + dW|| * (W + dW) x - W x, the DoRA output minus the base output
        norm_scale = (self.lora_magnitude_vector / self.weight_norm(self.delta_weight())).view(1, -1)  # (1, out)
        dropped = self.lora_dropout(x)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # reuse the base output, without its bias (the bias is not scaled by m)
            bias = getattr(self.base_layer, "bias", None)
            base_out = base_result if bias is None else base_result - bias
        else:
            # with dropout, peft recomputes W x on the dropped input so both terms see the same x
            base_out = F.linear(dropped, base_weight(self.base_layer).to(x.dtype))
        lora_out = self.lora_B(self.lora_A(dropped))
        return (norm_scale - 1) * base_out + norm_scale * lora_out * self.scale

    def merged_weight(self, weight: Tensor) -> Tensor:
        delta = self.delta_weight()
        norm = torch.linalg.norm(weight + delta, dim=1).detach()  # (out,)
        return (self.lora_magnitude_vector / norm).view(-1, 1) * (weight + delta)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        # the merged weight's row norms are m, so the pre-merge norm must be remembered (as peft does)
        factor = (self.lora_magnitude_vector / self._merge_norm).view(-1, 1)  # (out, 1)
        return weight / factor - self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self._full_precision_weight("merge").float()
            self._merge_norm = torch.linalg.norm(weight + self.delta_weight(), dim=1)  # (out,)
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self._merge_norm = None


# a new variant is one LoRALinear subclass and one entry here
ADAPTER_VARIANTS: dict[str, type[LoRALinear]] = {"lora": LoRALinear, "dora": DoRALinear}


# ------------------------------------------------------------------------------------------ injection


def check_lora_config(config: LoraConfig) -> None:
    """Raise ValueError naming the first field out of range."""
    if not isinstance(config.r, int) or config.r <= 0:
        raise ValueError(f"LoraConfig.r must be a positive integer, got {config.r!r}")
    if config.alpha <= 0:
        raise ValueError(f"LoraConfig.alpha must be > 0, got {config.alpha!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {config.dropout!r}")
    if config.variant not in ADAPTER_VARIANTS:
        raise ValueError(f"LoraConfig.variant must be one of {sorted(ADAPTER_VARIANTS)}, got {config.variant!r}")


def _is_target(name: str, target_modules: list[str] | str) -> bool:
    """peft's matching: a list matches name suffixes at a '.' boundary; a string is a full-match regex."""
    if target_modules == "all-linear":
        return name.split(".")[-1] not in DEFAULT_EXCLUDED
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear / NF4Linear modules an adapter could wrap (adapter internals excluded)."""
    inside = {f"{n}." for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, NF4Linear)) and not any(name.startswith(p) for p in inside)
    ]


def find_targets(model: nn.Module, config: LoraConfig, rename: Callable[[str], str] | None = None) -> list[str]:
    """The module names `inject_adapters` would wrap, without touching the model. target_modules is matched
    against `rename(name)` if given: the names the adapter's trainer saw (a multimodal checkpoint's)."""
    check_lora_config(config)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise RuntimeError("the model already has adapters; inject into a fresh model")
    available = linear_module_names(model)
    matched = [rename(name) if rename else name for name in available]
    targets = [name for name, seen in zip(available, matched) if _is_target(seen, config.target_modules)]
    if not targets:
        shown = sorted({n.split(".")[-1] for n in matched})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no linear module. Linear module names "
            f"(suffixes): {shown}; e.g. {matched[:4]}"
        )
    _refuse_tied_targets(model, targets)
    return targets


def _refuse_tied_targets(model: nn.Module, targets: list[str]) -> None:
    """A weight shared with another module (lm_head tied to the embeddings) cannot take an adapter:
    merging it would change the embeddings too, and a merged export stores the pair once."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name in targets:
        weight = getattr(model.get_submodule(name), "weight", None)
        others = [n for n in owners.get(id(weight), []) if n != f"{name}.weight"]
        if others:
            raise ValueError(
                f"target_modules: {name}.weight is tied to {others[0]} (tie_word_embeddings), so an adapter on "
                f"{name} would also change {others[0].rpartition('.')[0]} when merged; leave {name} out of "
                "target_modules"
            )


def inject_adapters(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap every targeted linear layer in place and freeze everything but the adapters.

    Returns the wrapped module names. Seed before calling: A is drawn here.
    """
    targets = find_targets(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    cls = ADAPTER_VARIANTS[config.variant]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        adapter = cls(base, config.r, config.alpha, config.dropout, config.use_rslora)
        adapter.train(base.training)  # a new module starts in train mode; follow the model's mode (dropout)
        setattr(parent, child, adapter)
    for param in adapter_parameters(model):
        param.requires_grad_(True)
    return targets


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) for every adapter-wrapped layer."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (what the optimizer gets)."""
    return [p for _, p in adapter_named_parameters(model)]


def adapter_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(`<module path>.<parameter>`, parameter) for every adapter parameter: all of a wrapped layer's but
    base_layer's, so a variant's extra parameters are trained, saved and loaded with no further code."""
    for name, module in lora_modules(model):
        for pname, param in module.named_parameters():
            if not pname.startswith("base_layer."):
                yield f"{name}.{pname}", param


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors by module path: `model.layers.0.self_attn.q_proj.lora_A.weight`, ..., detached."""
    return {name: param.detach() for name, param in adapter_named_parameters(model)}


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its (full-precision) base weight; see `LoRALinear.merge`."""
    for _, module in lora_modules(model):
        module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo `merge_adapters`."""
    for _, module in lora_modules(model):
        module.unmerge()


@contextmanager
def merged_for_inference(model: nn.Module):
    """Inside the block, adapters on dense fp32 base weights run merged: one product per projection
    instead of three (the rank-r products are thin and run far below the matmul rate; `score` on Gemma 3
    270M is 7 % faster, benchmarks/NOTES.md round 8). For inference only: the block runs under
    `torch.no_grad()`, so a backward inside it fails instead of leaving the adapters without gradients.

    The base weights are swapped, not changed: each layer gets a new tensor W + update, and on exit its
    original tensor back, bit for bit (merge / unmerge in place would leave rounding drift). Costs one
    extra copy of the adapted weights while the block runs. Left unmerged: disabled adapters (the
    baseline under `disable_adapters`) and layers whose `merges_exactly()` is False (NF4, bf16 / fp16
    or trained base weights)."""
    swapped: list[tuple[LoRALinear, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for _, module in lora_modules(model):
                if module.merged or module.disabled or not module.merges_exactly():
                    continue
                base = module.base_layer
                swapped.append((module, base.weight))
                base.weight = nn.Parameter(module.merged_weight(base.weight), requires_grad=False)
                module.merged = True
            yield model
    finally:
        for module, original in swapped:
            module.base_layer.weight = original
            module.merged = False


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block (e.g. reference logits for a KL term)."""
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged for m in modules):
        raise RuntimeError("disable_adapters: adapters are merged into the base weights; unmerge_adapters(model) first")
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False


def trainable_summary(model: nn.Module) -> str:
    """One line: "trainable params: X || all params: Y || trainable%: Z".

    Tied parameters count once; an NF4 weight counts as its out * in logical entries.
    """
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    percent = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"


def remove_adapters(model: nn.Module) -> list[str]:
    """Put every wrapped layer's `base_layer` back (unmerged adapters are simply dropped), so another
    adapter can be loaded onto the same base. Returns the unwrapped module names."""
    names = [name for name, _ in lora_modules(model)]
    for name in names:
        module = model.get_submodule(name)
        if module.merged:
            module.unmerge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base_layer)
    return names

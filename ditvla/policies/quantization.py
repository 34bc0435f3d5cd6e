"""Post-training quantization of a trained policy, QuantVLA-style.

**Selective layout** (configurable): integerize the linear layers of the language model's
MLPs and of the DiT heads' MLPs; keep in floating point the attention projections,
embeddings, norms, the vision encoder, adaLN modulations and the input/output projections
of the heads (the final action projection above all). ``head_attention`` also integerizes
the DiT heads' attention projections (queries, keys/values, outputs): a third of the
weights each denoising step reads, off in QuantVLA's layout. ``head_modulation`` also
integerizes the heads' adaLN modulation layers (run once per chunk, for all its steps).

**Corrections**, calibrated on a small unlabeled buffer of observations, both folded into
floating-point weights so that they cost nothing at run time:

- *attention temperature matching* (ATM): quantizing the MLPs shifts the residual stream
  that feeds each attention layer, and with it the spread of the attention logits; a
  per-head scale (the float model's logit standard deviation over the quantized one's)
  restores it, folded into the query projection;
- *output head balancing* (OHB): a per-layer scale that restores the energy (RMS) the
  residual stream receives from each attention output projection, folded into it.

**Backends**: torchao's ``quantize_`` (the maintained path: ``w8a8`` int8 dynamic
activations + int8 weights, ``w8`` int8 weight-only, ``w4a8`` int4 weights + int8
dynamic activations), and for ``w8a8`` on the CPU also PyTorch's FBGEMM dynamic int8
kernels (``backend="fbgemm"``), faster than torchao's eagerly on the CPUs we measured
(docs/quantization.md).

A quantized policy folder holds the float weights (with the corrections folded in) and
the recipe; loading re-applies the same deterministic quantization.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, get_args

import torch
from torch import nn

from ditvla.contract import HeadDType, PolicyInputError
from ditvla.errors import DitvlaError
from ditvla.policies.timing import paired_median_ms

SCHEMES = ("w8a8", "w8", "w4a8")
# what an action head can compute in at inference (--head-dtype), as torch dtypes
HEAD_DTYPES = {name: getattr(torch, name) for name in get_args(HeadDType)}
BACKENDS = ("torchao", "fbgemm")
# The parts of a policy the layout can integerize (QuantizationConfig's switches).
LAYOUT_PARTS = ("language_mlp", "head_mlp", "head_attention", "head_modulation")


class QuantizationError(DitvlaError, ValueError):
    """A scheme or backend that cannot run here, or a calibration set that does not fit."""


@dataclass
class QuantizationConfig:
    """A quantization recipe: which layers become integer, how, and the corrections.

    ``filled_in``: the layout's switches (set from ``--layout``) and the calibrated scales.

    Args:
        scheme: w8a8 (int8 weights, int8 dynamic activations), w8 (int8 weights) or
            w4a8 (int4 weights, int8 dynamic activations).
        backend: fbgemm (PyTorch's dynamic int8 kernels: w8a8 only, CPU only, the fastest
            here), torchao (its quantize_), or auto: fbgemm for w8a8, else torchao.
        attention_temperature_matching: calibrate per attention head the float model's
            logit spread over the quantized one's and fold it into the query projection.
        output_head_balancing: calibrate per layer the RMS ratio of the attention output
            and fold it into the output projection.
    """

    filled_in: ClassVar[tuple[str, ...]] = (*LAYOUT_PARTS, "atm_scales", "ohb_scales")

    scheme: str = "w8a8"
    backend: str = "auto"
    language_mlp: bool = True
    head_mlp: bool = True
    head_attention: bool = False
    head_modulation: bool = False
    attention_temperature_matching: bool = True
    output_head_balancing: bool = True
    atm_scales: dict[str, list[float]] = field(default_factory=dict)
    ohb_scales: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"unknown scheme {self.scheme!r}; choose {', '.join(SCHEMES)}")
        if self.backend == "auto":
            self.backend = "fbgemm" if self.scheme == "w8a8" else "torchao"
        if self.backend not in BACKENDS:
            raise QuantizationError(
                f"unknown backend {self.backend!r}; choose auto, {', '.join(BACKENDS)}"
            )
        if self.backend == "fbgemm" and self.scheme != "w8a8":
            raise QuantizationError(
                f"the fbgemm backend runs w8a8 only; use --backend torchao for {self.scheme}"
            )

    @property
    def layout(self) -> str:
        """The integer parts, comma-separated (``--layout``)."""
        return ",".join(part for part in LAYOUT_PARTS if getattr(self, part))

    @classmethod
    def from_layout(cls, layout: str, **options: Any) -> QuantizationConfig:
        """A config from a comma-separated list of :data:`LAYOUT_PARTS`."""
        parts = [p.strip() for p in layout.split(",") if p.strip()]
        unknown = [p for p in parts if p not in LAYOUT_PARTS]
        if unknown or not parts:
            raise QuantizationError(
                f"layout {layout!r}: unknown part(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(LAYOUT_PARTS)}"
            )
        return cls(**{part: part in parts for part in LAYOUT_PARTS}, **options)

    @classmethod
    def from_dict(cls, recipe: dict[str, Any]) -> QuantizationConfig:
        """A saved recipe; fields this version does not know mean a newer ditvla wrote it."""
        unknown = sorted(set(recipe) - {f.name for f in fields(cls)})
        if unknown:
            raise QuantizationError(
                f"the quantization recipe has fields this ditvla does not know "
                f"({', '.join(unknown)}): it was written by a newer ditvla; upgrade ditvla"
            )
        return cls(**recipe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- layout
def _is_language_mlp(name: str) -> bool:
    return name.startswith("backbone.language.") and ".mlp." in name


# The DiT heads' blocks: the action head's and the foresight head's (trained jointly, never
# run by act). Matching inside them keeps the heads' timestep embedders and the latent
# foresight's target encoder (a vision encoder) out of the layout.
_DIT_BLOCKS = ("head.blocks.", "foresight.dit.blocks.")
_DIT_FINAL_MODULATION = ("head.final_ada.", "foresight.dit.final_ada.")


def _is_head_mlp(name: str) -> bool:
    return name.startswith(_DIT_BLOCKS) and ".mlp." in name


def _is_head_attention(name: str) -> bool:
    """The query, key/value and output projections of the DiT heads' attention layers."""
    return name.startswith(_DIT_BLOCKS) and name.endswith((".q", ".kv", ".out"))


def _is_head_modulation(name: str) -> bool:
    """The adaLN modulation layers of the DiT heads (per block, and the final layer's)."""
    return (name.startswith(_DIT_BLOCKS) and ".ada." in name) or name.startswith(
        _DIT_FINAL_MODULATION
    )


def selected_linears(policy: nn.Module, config: QuantizationConfig) -> list[str]:
    """Names of the nn.Linear modules the layout integerizes."""
    names = []
    for name, module in policy.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if (
            (config.language_mlp and _is_language_mlp(name))
            or (config.head_mlp and _is_head_mlp(name))
            or (config.head_attention and _is_head_attention(name))
            or (config.head_modulation and _is_head_modulation(name))
        ):
            names.append(name)
    return names


@functools.cache
def supported_schemes() -> tuple[str, ...]:
    """The schemes whose kernels run on this machine (tried once on a small layer)."""
    ok = []
    for scheme in SCHEMES:
        layer = nn.Sequential(nn.Linear(64, 64))
        try:
            _quantize(
                layer,
                QuantizationConfig(scheme=scheme, backend="torchao"),
                lambda m, n: isinstance(m, nn.Linear),
            )
            with torch.inference_mode():
                layer(torch.randn(2, 64))
            ok.append(scheme)
        except Exception:  # any failure means the kernel is unusable here
            pass
    return tuple(ok)


def _torchao_config(scheme: str):
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
    )

    if scheme == "w8a8":
        return Int8DynamicActivationInt8WeightConfig()
    if scheme == "w8":
        return Int8WeightOnlyConfig()
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4)


class FbgemmInt8Linear(nn.Module):
    """A linear layer on FBGEMM's dynamic int8 kernel: int8 weights (per-tensor,
    symmetric), activations quantized per call, float output.

    The kernel is called directly (``quantized::linear_dynamic``): at 17 rows (batch 1,
    a 16-step chunk and the state token) a product takes 40-160 microseconds here, and
    the ``torch.ao`` module around the same kernel added 35-40 more in Python."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = max(weight.abs().max().item() / 127.5, torch.finfo(torch.float32).eps)
        qweight = torch.quantize_per_tensor(weight, scale, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self._linear = torch.ops.quantized.linear_dynamic.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, so that AVX2's 16-bit pair sums cannot saturate
        return self._linear(x, self._packed, True)

    def weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The quantized weight and the float bias."""
        return torch.ops.quantized.linear_unpack(self._packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def head_dtype(head: nn.Module, name: str) -> torch.dtype:
    """The torch dtype an action head runs in for ``--head-dtype name``; PolicyInputError
    for a name not in :data:`HEAD_DTYPES`, or a narrower float for a quantized head."""
    if name not in HEAD_DTYPES:
        raise PolicyInputError(f"head dtype {name!r} is not one of {', '.join(HEAD_DTYPES)}")
    integer = integer_layers(head)
    if integer and name != "float32":
        raise PolicyInputError(
            f"head dtype {name!r}: this policy's head is quantized ({len(integer)} int8 "
            f"layers, e.g. {integer[0]}); use the float policy with --head-dtype {name}, "
            "or the quantized one as it is"
        )
    return HEAD_DTYPES[name]


def integer_layers(model: nn.Module) -> list[str]:
    """Names of the layers in ``model`` that a quantization made integer (FBGEMM's int8
    layers, or linear layers holding torchao's quantized weights)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, FbgemmInt8Linear)
        or (isinstance(module, nn.Linear) and type(module.weight.data) is not torch.Tensor)
    ]


def _quantize(model: nn.Module, config: QuantizationConfig, keep: Callable) -> None:
    if config.backend == "fbgemm":
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise QuantizationError(
                f"the fbgemm backend runs on the CPU only and this policy is on {device}: "
                "load it with map_location='cpu', or quantize with --backend torchao"
            )
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Linear) and keep(child, full):
                    setattr(module, child_name, FbgemmInt8Linear(child))
        return
    from torchao.quantization import quantize_

    quantize_(model, _torchao_config(config.scheme), filter_fn=keep)


# ---------------------------------------------------------------------- calibration
def _attention_modules(policy: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention layers whose query projection ATM scales: (name, module with q_proj)."""
    return [
        (name, module)
        for name, module in policy.named_modules()
        if name.startswith("backbone.language.")
        and hasattr(module, "q_proj")
        and hasattr(module, "o_proj")
    ]


def _logit_and_output_stats(
    policy: nn.Module, run: Callable[[], None]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per-head std of attention logits (from q and k) and RMS of each o_proj output."""
    logits: dict[str, list[torch.Tensor]] = {}
    outputs: dict[str, list[float]] = {}
    captured: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, attention in _attention_modules(policy):
        heads = attention.config.num_attention_heads
        kv_heads = getattr(attention.config, "num_key_value_heads", heads)

        def keep(kind, name=name):
            def hook(module, inputs, output):
                captured.setdefault(name, {})[kind] = output.detach().float()

            return hook

        def finish(module, inputs, output, name=name, heads=heads, kv_heads=kv_heads):
            q, k = captured[name]["q"], captured[name]["k"]
            b, length, _ = q.shape
            q = q.reshape(b, length, heads, -1).transpose(1, 2)
            k = k.reshape(b, length, kv_heads, -1).transpose(1, 2)
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            scores = q @ k.transpose(-1, -2)  # (B, heads, L, L)
            logits.setdefault(name, []).append(scores.std(dim=(0, 2, 3)))
            outputs.setdefault(name, []).append(output.detach().float().pow(2).mean().sqrt().item())

        hooks += [
            attention.q_proj.register_forward_hook(keep("q")),
            attention.k_proj.register_forward_hook(keep("k")),
            attention.o_proj.register_forward_hook(finish),
        ]
    try:
        with torch.inference_mode():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return (
        {k: torch.stack(v).mean(0) for k, v in logits.items()},
        {k: sum(v) / len(v) for k, v in outputs.items()},
    )


@dataclass
class QuantizedPolicy:
    model: nn.Module  # the quantized policy, ready to run
    folded: nn.Module  # the float policy with the ATM / OHB corrections folded in
    config: QuantizationConfig
    layers: list[str]  # the integerized layers

    def save(self, folder) -> None:
        """A policy folder that ``DiTVLAPolicy.from_pretrained`` loads quantized."""
        self.folded.save_pretrained(folder, quantization=self.config.to_dict())


def check_calibration(policy: nn.Module, observations: list[dict[str, Any]]) -> None:
    """Fail before any weight changes when the calibration data does not fit the policy."""
    if not observations:
        raise QuantizationError("no calibration observations")
    config = policy.config
    for obs in observations:
        missing = [k for k in ("images", "instruction") if k not in obs]
        missing += [f"images/{c}" for c in config.cameras if c not in obs.get("images", {})]
        if missing:
            raise QuantizationError(
                f"calibration observation lacks {', '.join(missing)} (the policy reads "
                f"cameras {config.cameras} and an instruction)"
            )
    with torch.inference_mode():
        policy.encode(observations[0])  # shapes, dtypes, NaN: the policy's own checks


def quantize_policy(
    policy: nn.Module,
    config: QuantizationConfig,
    calibration: Iterable[dict[str, Any]] = (),
) -> QuantizedPolicy:
    """Quantize a copy of ``policy`` (left as is) with the selective layout; ATM / OHB
    calibrated on ``calibration`` (batched observation dicts for ``policy.encode``).

    The corrections are measured on a first quantized copy (statistics of the float
    model vs the quantized one), folded into the float weights, and the folded float
    model is quantized again: what is saved (folded float weights + recipe) rebuilds
    exactly the model returned."""
    available = supported_schemes()
    if config.scheme not in available:
        raise QuantizationError(
            f"scheme {config.scheme} cannot run on this machine; available here: "
            f"{', '.join(available) or 'none'}"
        )
    observations = list(calibration)
    corrections = config.attention_temperature_matching or config.output_head_balancing
    if corrections:
        check_calibration(policy, observations)
    layers = selected_linears(policy, config)
    if not layers:
        raise QuantizationError(
            f"the layout selects no layers (enable one of {', '.join(LAYOUT_PARTS)})"
        )
    keep = set(layers)

    def encode_all(model):
        return lambda: [model.encode(obs) for obs in observations]

    folded = copy.deepcopy(policy).eval()
    if corrections:
        float_logits, float_rms = _logit_and_output_stats(policy, encode_all(policy))
        probe = copy.deepcopy(policy).eval()
        _quantize(probe, config, lambda module, fqn: fqn in keep)
        quant_logits, quant_rms = _logit_and_output_stats(probe, encode_all(probe))
        del probe
        _fold_corrections(folded, config, float_logits, quant_logits, float_rms, quant_rms)
    model = apply_recipe(copy.deepcopy(folded), config)
    return QuantizedPolicy(model, folded, config, layers)


def _fold_corrections(model, config, float_logits, quant_logits, float_rms, quant_rms) -> None:
    modules = dict(_attention_modules(model))
    with torch.no_grad():
        for name, attention in modules.items():
            if config.attention_temperature_matching:
                scale = (float_logits[name] / quant_logits[name].clamp(min=1e-8)).clamp(0.5, 2.0)
                config.atm_scales[name] = scale.tolist()
                _scale_query_heads(attention, scale)
            if config.output_head_balancing:
                scale = min(2.0, max(0.5, float_rms[name] / max(quant_rms[name], 1e-8)))
                config.ohb_scales[name] = scale
                attention.o_proj.weight.mul_(scale)
                if attention.o_proj.bias is not None:
                    attention.o_proj.bias.mul_(scale)


def _scale_query_heads(attention: nn.Module, scale: torch.Tensor) -> None:
    q = attention.q_proj
    per_row = scale.repeat_interleave(q.out_features // scale.numel()).to(q.weight.dtype)
    q.weight.mul_(per_row[:, None])
    if q.bias is not None:
        q.bias.mul_(per_row)


def apply_recipe(policy: nn.Module, config: QuantizationConfig) -> nn.Module:
    """Re-create a saved quantized policy: the corrections are already in the float
    weights; quantize the same layers the same way."""
    names = set(selected_linears(policy, config))
    _quantize(policy, config, lambda module, fqn: fqn in names)
    return policy


# ---------------------------------------------------------------------- reporting
def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's own weights: quantized tensors at their stored size (int8 /
    packed int4 data plus scales), FBGEMM's packed int8 weights likewise."""
    total = sum(
        _tensor_bytes(t)
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    )
    if isinstance(module, FbgemmInt8Linear):
        weight, bias = module.weight_bias()
        total += weight.int_repr().numel() + 12  # int8 data + scale/zero point
        total += 0 if bias is None else bias.numel() * bias.element_size()
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    inner = getattr(data, "__tensor_flatten__", None)
    if inner is not None and type(data) is not torch.Tensor:
        names, _ = data.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(data, n)) for n in names)
    return data.numel() * data.element_size()


def layer_memory(model: nn.Module, names: Iterable[str]) -> int:
    modules = dict(model.named_modules())
    return sum(module_bytes(modules[n]) for n in names)


def measure(
    float_policy: nn.Module, result: QuantizedPolicy, held_out: list[dict], repeats: int = 40
) -> dict:
    """Memory of the quantized layers, encode/act latency (batch 1, medians of ``repeats``
    calls of each in turn: fewer let close layouts swap places between runs), relative
    action error on held-out frames with the same noise."""
    quantized = result.model
    one = {
        "images": {c: v[:1] for c, v in held_out[0]["images"].items()},
        "instruction": held_out[0]["instruction"][:1],
        "state": held_out[0]["state"][:1],
    }
    models = {"float": float_policy, "quantized": quantized}
    with torch.inference_mode():  # each pair timed in turn: same machine load for both
        device = next(float_policy.parameters()).device
        encode_ms = paired_median_ms(
            [lambda m=m: m.encode(one) for m in models.values()], repeats, device=device
        )
        contexts = [m.encode(one) for m in models.values()]
        act_ms = paired_median_ms(
            [
                lambda m=m, c=c: m.act(c, one["state"])
                for m, c in zip(models.values(), contexts, strict=True)
            ],
            repeats,
            device=device,
        )
    timings = {
        name: {"encode_ms": e, "act_ms": a}
        for name, e, a in zip(models, encode_ms, act_ms, strict=True)
    }
    before = layer_memory(float_policy, result.layers)
    after = layer_memory(quantized, result.layers)
    return {
        "scheme": result.config.scheme,
        "backend": result.config.backend,
        "atm": result.config.attention_temperature_matching,
        "ohb": result.config.output_head_balancing,
        "layers": result.layers,
        "memory_bytes": {"before": before, "after": after},
        "memory_saved": 1 - after / before,
        "latency": timings,
        "act_speedup": timings["float"]["act_ms"] / timings["quantized"]["act_ms"],
        "encode_speedup": timings["float"]["encode_ms"] / timings["quantized"]["encode_ms"],
        "relative_action_error": relative_action_error(float_policy, quantized, held_out),
    }


def relative_action_error(
    float_policy: nn.Module, quantized: nn.Module, held_out: list[dict]
) -> float:
    """Mean over the held-out batches of |quantized - float| / |float| for the action
    chunks, both policies given the same initial noise."""
    errors = []
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for obs in held_out:
            noise = torch.randn(
                len(obs["instruction"]), *float_policy.noise_shape, generator=generator
            )
            ref = float_policy.act(float_policy.encode(obs), obs["state"], noise=noise)
            out = quantized.act(quantized.encode(obs), obs["state"], noise=noise)
            errors.append(((out - ref).norm() / ref.norm().clamp(min=1e-8)).item())
    return sum(errors) / len(errors)


def report_markdown(report: dict) -> str:
    lat, mem = report["latency"], report["memory_bytes"]
    f, q = lat["float"], lat["quantized"]
    rows = [
        f"| quantized layers' memory | {mem['before'] / 1e6:.2f} MB | "
        f"{mem['after'] / 1e6:.2f} MB (-{report['memory_saved']:.0%}) |",
        f"| `encode` (batch 1) | {f['encode_ms']:.1f} ms | "
        f"{q['encode_ms']:.1f} ms ({report['encode_speedup']:.2f}x) |",
        f"| `act` (batch 1) | {f['act_ms']:.1f} ms | "
        f"{q['act_ms']:.1f} ms ({report['act_speedup']:.2f}x) |",
    ]
    layers = "\n".join(f"- `{name}`" for name in report["layers"])
    on = {True: "on", False: "off"}
    return (
        f"# Quantization report\n\nScheme **{report['scheme']}** ({report['backend']}), "
        f"attention temperature matching {on[report['atm']]}, output head balancing "
        f"{on[report['ohb']]}.\n\n| | float | quantized |\n|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nRelative action error on held-out frames (same noise): "
        f"{report['relative_action_error']:.4f}.\n\nQuantized layers "
        f"({len(report['layers'])}):\n\n{layers}\n"
    )

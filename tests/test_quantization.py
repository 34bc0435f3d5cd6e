"""Post-training quantization: layout, schemes, ATM / OHB, saving and loading, bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_policy import make_policy, write_reaching_store
from torch import nn

from ditvla.contract import CheckpointError, PolicyInputError
from ditvla.datasets.observations import observations_from_store
from ditvla.datasets.replay_buffer import ReplayBuffer
from ditvla.policies.config import PolicyConfig
from ditvla.policies.policy import DiTVLAPolicy
from ditvla.policies.quantization import (
    QuantizationConfig,
    QuantizationError,
    _logit_and_output_stats,
    apply_recipe,
    layer_memory,
    measure,
    quantize_policy,
    selected_linears,
    supported_schemes,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "reach.zarr"
    write_reaching_store(path, episodes=5)
    return path


@pytest.fixture(scope="module")
def policy(store):
    """A policy whose every weight matters: adaLN-Zero and the zero-initialized action
    projection get random values, as training would give them."""
    torch.manual_seed(0)
    policy, _ = make_policy(store, horizon=8)
    with torch.no_grad():
        for parameter in policy.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.05)
    return policy.eval()


@pytest.fixture(scope="module")
def calibration(store, policy):
    return observations_from_store(store, policy.spec, 16)


@pytest.fixture(scope="module")
def held_out(store, policy):
    return observations_from_store(store, policy.spec, 8, held_out=True)


def test_layout_integerizes_only_the_mlps(policy, calibration):
    result = quantize_policy(policy, QuantizationConfig("w8a8", "fbgemm"), calibration)
    modules = dict(result.model.named_modules())
    assert result.layers and all(".mlp." in name for name in result.layers)
    assert any(n.startswith("backbone.language.") for n in result.layers)
    assert any(n.startswith("head.blocks.") for n in result.layers)
    for name in result.layers:
        assert not isinstance(modules[name], nn.Linear) or type(modules[name]) is not nn.Linear
    for name, module in modules.items():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "action_out", "action_in")):
            assert type(module) is nn.Linear and module.weight.dtype == torch.float32, name
    # the float policy is left untouched
    assert all(type(dict(policy.named_modules())[n]) is nn.Linear for n in result.layers)


@pytest.mark.parametrize(
    "scheme, backend, saved",
    [
        ("w8a8", "fbgemm", 0.65),
        ("w8a8", "torchao", 0.65),
        ("w8", "torchao", 0.65),
        ("w4a8", "torchao", 0.65),
    ],
)
def test_schemes_shrink_the_layers_and_keep_the_actions(
    policy, calibration, held_out, scheme, backend, saved
):
    if scheme not in supported_schemes():
        pytest.skip(f"{scheme} kernels unavailable here")
    result = quantize_policy(policy, QuantizationConfig(scheme, backend), calibration)
    before = layer_memory(policy, result.layers)
    assert layer_memory(result.model, result.layers) < (1 - saved) * before
    report = measure(policy, result, held_out)
    assert report["relative_action_error"] < 0.05
    assert report["memory_saved"] > saved


def test_atm_and_ohb_restore_the_float_statistics(policy, calibration):
    def stats(model):
        return _logit_and_output_stats(model, lambda: [model.encode(o) for o in calibration])

    float_logits, float_rms = stats(policy)
    plain = quantize_policy(
        policy,
        QuantizationConfig(
            "w8a8", "fbgemm", attention_temperature_matching=False, output_head_balancing=False
        ),
        calibration,
    )
    corrected = quantize_policy(policy, QuantizationConfig("w8a8", "fbgemm"), calibration)
    assert corrected.config.atm_scales and corrected.config.ohb_scales
    for model_stats, name in ((stats(plain.model), "plain"), (stats(corrected.model), "corrected")):
        logits, rms = model_stats
        gap = max(abs(float_rms[k] / rms[k] - 1) for k in rms)
        logit_gap = max((float_logits[k] / logits[k] - 1).abs().max().item() for k in logits)
        if name == "plain":
            plain_gap, plain_logit_gap = gap, logit_gap
        else:
            assert gap <= plain_gap + 1e-4 and logit_gap <= plain_logit_gap + 1e-4


def test_head_attention_layout_integerizes_the_heads_attention_too(
    policy, calibration, held_out, tmp_path
):
    config = QuantizationConfig.from_layout(
        "language_mlp,head_mlp,head_attention", scheme="w8a8", backend="fbgemm"
    )
    result = quantize_policy(policy, config, calibration)
    attention = [n for n in result.layers if n.startswith("head.") and ".mlp." not in n]
    kinds = {".".join(name.split(".")[-2:]) for name in attention}
    assert kinds == {f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q", "kv", "out")}
    modules = dict(result.model.named_modules())
    assert all(type(modules[name]) is not nn.Linear for name in attention)
    for name, module in modules.items():  # the language model's attention and the I/O stay float
        if name.endswith(("q_proj", "k_proj", "o_proj", "action_out", "action_in", "context_proj")):
            assert type(module) is nn.Linear, name
    report = measure(policy, result, held_out)
    assert report["relative_action_error"] < 0.05
    result.save(tmp_path / "q")
    loaded = dict(DiTVLAPolicy.from_pretrained(tmp_path / "q").named_modules())
    assert all(type(loaded[name]) is not nn.Linear for name in attention)


def test_head_modulation_layout_integerizes_the_adaln_layers(policy, calibration, held_out):
    config = QuantizationConfig.from_layout("head_modulation", scheme="w8a8", backend="fbgemm")
    result = quantize_policy(policy, config, calibration)
    blocks = [f"head.blocks.{i}.ada.1" for i in range(policy.config.head.depth)]
    assert sorted(n for n in result.layers if n.startswith("head.")) == sorted(
        [*blocks, "head.final_ada.1"]
    )
    assert not any(n.startswith("backbone.") for n in result.layers)
    assert measure(policy, result, held_out)["relative_action_error"] < 0.05


def test_layout_reaches_only_into_the_dit_blocks():
    config = PolicyConfig.preset(
        "tiny", cameras=["cam"], state_dim=3, action_dim=2, foresight={"kind": "latent"}
    )
    everything = QuantizationConfig.from_layout("head_mlp,head_attention,head_modulation")
    names = selected_linears(DiTVLAPolicy(config), everything)
    assert any(n.startswith("foresight.dit.blocks.") for n in names)
    assert "head.final_ada.1" in names and "foresight.dit.final_ada.1" in names
    # timestep embedders and the latent foresight's target (vision) encoder stay float
    assert not [n for n in names if "time_embed" in n or "target_encoder" in n]


def test_layout_names_are_checked():
    assert QuantizationConfig.from_layout("head_mlp").language_mlp is False
    with pytest.raises(QuantizationError, match=r"unknown part.*mlp.*choose from language_mlp"):
        QuantizationConfig.from_layout("head_mlp,mlp")
    with pytest.raises(QuantizationError, match="none given"):
        QuantizationConfig.from_layout(" , ")


def test_saved_quantized_policy_loads_as_the_same_model(policy, calibration, held_out, tmp_path):
    result = quantize_policy(policy, QuantizationConfig("w8a8", "fbgemm"), calibration)
    result.save(tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["format_version"] == 2 and meta["quantization"]["scheme"] == "w8a8"
    loaded = DiTVLAPolicy.from_pretrained(tmp_path / "q")
    obs = held_out[0]
    noise = torch.randn(len(obs["instruction"]), 8, policy.config.action_dim)
    expected = result.model.act(result.model.encode(obs), obs["state"], noise=noise)
    torch.testing.assert_close(loaded.act(loaded.encode(obs), obs["state"], noise=noise), expected)
    assert layer_memory(loaded, result.layers) == layer_memory(result.model, result.layers)
    # a recipe written by a newer ditvla (a field this one lacks) is refused by name
    meta["quantization"]["rotation"] = "hadamard"
    (tmp_path / "q" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"rotation.*newer ditvla; upgrade ditvla"):
        DiTVLAPolicy.from_pretrained(tmp_path / "q")


def test_fbgemm_refuses_a_policy_off_the_cpu(policy):
    # on a GPU machine the device is CUDA (bench/gpu_check.py); "meta" stands in here
    off_cpu = copy.deepcopy(policy).to("meta")
    with pytest.raises(QuantizationError, match=r"CPU only.*on meta.*--backend torchao"):
        apply_recipe(off_cpu, QuantizationConfig("w8a8", "fbgemm"))


def test_bad_input_fails_before_any_weight_changes(policy, calibration):
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    wrong = [
        {"images": {"other": obs["images"]["cam"]}, "instruction": obs["instruction"]}
        for obs in calibration
    ]
    with pytest.raises(QuantizationError, match="lacks images/cam"):
        quantize_policy(policy, QuantizationConfig("w8a8", "fbgemm"), wrong)
    with pytest.raises(QuantizationError, match="w8a8, w8, w4a8"):
        QuantizationConfig("w2")
    with pytest.raises(QuantizationError, match="fbgemm backend runs w8a8 only"):
        QuantizationConfig("w4a8", "fbgemm")
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def run_quantize(policy_dir, calibration, out, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ditvla.cli", "quantize", "--policy", str(policy_dir)]
    command += ["--calibration", str(calibration), "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True)


def test_cli_quantize_writes_a_policy_and_a_report(store, policy, tmp_path):
    policy.save_pretrained(tmp_path / "float")
    done = run_quantize(tmp_path / "float", store, tmp_path / "q", "--frames", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    assert report["memory_saved"] > 0.65 and "act_speedup" in report
    # a store without the policy's camera: one clear line, exit 2, nothing written
    other = tmp_path / "other.zarr"
    buffer = ReplayBuffer.create(other, fps=10, cameras=["front"])
    buffer.append_episode(
        {
            "front": np.zeros((4, 32, 32, 3), np.uint8),
            "state": np.zeros((4, 3)),
            "action": np.zeros((4, 2)),
        },
        task="t",
        instruction="i",
    )
    done = run_quantize(tmp_path / "float", other, tmp_path / "q2")
    assert done.returncode == 2 and "lacks camera(s) cam" in done.stderr
    assert not (tmp_path / "q2").exists()


@pytest.mark.parametrize("backend", ["fbgemm", "torchao"])
def test_a_quantized_head_refuses_bfloat16_by_name(policy, calibration, backend):
    if backend == "torchao" and "w8a8" not in supported_schemes():
        pytest.skip("torchao's w8a8 does not run on this machine")
    result = quantize_policy(policy, QuantizationConfig("w8a8", backend), calibration)
    with pytest.raises(PolicyInputError, match=r"head dtype 'bfloat16'.*quantized.*int8"):
        result.model.set_head_dtype("bfloat16")
    result.model.set_head_dtype("float32")  # what it already is: nothing to refuse

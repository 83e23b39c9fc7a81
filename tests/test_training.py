"""Training steps, gradient checkpointing, loss-and-gradient parity with timm, and the training-memory count."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from poolformer import ConfigError, create_model
from poolformer.training import (
    OPTIMIZER_STATE_TENSORS, compare_grads, fixed_labels, loss_and_grads, make_optimizer, saved_activation_bytes,
    train_step, training_memory,
)
from poolformer.weights import export_state_dict
from poolformer.model import randomize_

ROOT = Path(__file__).resolve().parents[1]


def _batch(size: int = 64, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return x, fixed_labels(batch, 1000, "cpu")


def test_a_train_step_changes_the_weights_and_leaves_no_gradients():
    model = randomize_(create_model("s12"), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = train_step(model, *_batch(), optimizer="adamw")
    step()
    assert model.training and step.last_loss is not None and step.last_loss.ndim == 0
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    assert len(step.optimizer.state) == len(list(model.parameters()))


def test_fp16_steps_scale_the_loss_and_sgd_keeps_momentum():
    step = train_step(create_model("s12"), *_batch(), optimizer="sgd", precision="fp16")
    assert step.scaler is not None
    step()
    assert all("momentum_buffer" in s for s in step.optimizer.state.values())


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'; choose from: sgd, adamw"):
        make_optimizer("lamb", create_model("s12").parameters())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    x, y = _batch()
    model = randomize_(create_model("s12"), seed=2)  # with s12's stochastic depth: recomputing draws alike
    torch.manual_seed(0)
    plain = loss_and_grads(model.train(), x, y)
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    recomputed = loss_and_grads(model, x, y)
    parity = compare_grads(recomputed, plain, "ours", 2, "fp32")
    assert parity.ok and parity.grad_relative_diff < 1e-5 and parity.loss_relative_diff < 1e-6


@pytest.mark.parametrize("name", ["s12", "v2_s12"])
def test_our_loss_and_gradients_match_timm_with_the_same_weights(name):
    """v2: timm's model as it is. v1: timm's head pools before normalising, so the reference is timm's
    backbone under the original head (normalise the map, then pool), spelled out here."""
    ours = randomize_(create_model(name, drop_path_rate=0.0), seed=3).train()  # timm's default: no drop path
    twin = timm.create_model(ours.spec.name).train()
    twin.load_state_dict(export_state_dict(ours, "timm"))
    x, y = _batch()

    def original_head(model, images):
        features = model.forward_features(images)
        pooled = F.group_norm(features, 1, model.head.norm.weight, model.head.norm.bias, 1e-5).mean((2, 3))
        return model.head.fc(pooled)

    reference = loss_and_grads(twin, x, y, forward=original_head if ours.spec.family == "v1" else None)
    parity = compare_grads(loss_and_grads(ours, x, y), reference, "timm", 2, "fp32")
    assert parity.ok, parity
    assert parity.grad_relative_diff < 1e-4 and parity.loss_relative_diff < 1e-6


def test_parity_fails_on_different_weights_and_on_missing_gradients():
    x, y = _batch()
    a = loss_and_grads(randomize_(create_model("s12", drop_path_rate=0.0), seed=4).train(), x, y)
    b = loss_and_grads(randomize_(create_model("s12", drop_path_rate=0.0), seed=5).train(), x, y)
    assert not compare_grads(a, b, "ours", 2, "fp32").ok
    partial = (a[0], {k: v for k, v in a[1].items() if "head" not in k})
    result = compare_grads(partial, a, "ours", 2, "fp32")
    assert not result.ok and result.worst_parameter.startswith("unmatched: head.")


def test_training_memory_counts_parameters_gradients_and_optimizer_state():
    model = create_model("s12")
    params = 11_915_176 * 4
    sgd = training_memory(model, 1, 64, 64, "sgd")
    adamw = training_memory(model, 1, 64, 64, "adamw")
    assert sgd.params_bytes == sgd.grads_bytes == params
    assert sgd.optimizer_bytes == OPTIMIZER_STATE_TENSORS["sgd"] * params
    assert adamw.optimizer_bytes == 2 * params
    assert sgd.activations_bytes == adamw.activations_bytes > 0
    assert sgd.activations_checkpointed_bytes < sgd.activations_bytes
    assert sgd.total_bytes == 3 * params + sgd.activations_bytes


def test_training_memory_extrapolates_exactly_in_the_batch_and_counts_on_the_meta_device():
    model = create_model("s12")
    direct = saved_activation_bytes(model, torch.zeros(5, 3, 64, 64))
    estimate = training_memory(model, 5, 64, 64)
    assert (estimate.activations_bytes, estimate.activations_checkpointed_bytes) == direct
    meta = training_memory(create_model("s12").to("meta"), 5, 64, 64)
    assert meta == estimate


def test_counting_leaves_checkpointing_and_mode_as_they_were():
    model = create_model("s12").eval()
    model.set_grad_checkpointing(True)
    with_ckpt = saved_activation_bytes(model, torch.zeros(1, 3, 64, 64))
    model.set_grad_checkpointing(False)
    assert with_ckpt == saved_activation_bytes(model, torch.zeros(1, 3, 64, 64))
    model.set_grad_checkpointing(True)
    saved_activation_bytes(model, torch.zeros(1, 3, 64, 64))
    assert not model.training and all(stage.grad_checkpointing for stage in model.stages)


MEASURE = textwrap.dedent("""
    import gc, json, sys, torch
    from pathlib import Path
    from poolformer import create_model
    from poolformer.training import saved_activation_bytes

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith(key))

    torch.set_num_threads(1)
    checkpointing = sys.argv[1] == "1"
    model = create_model("s12").train()
    x = torch.randn(4, 3, 160, 160)
    estimate = saved_activation_bytes(model, x)[1 if checkpointing else 0]
    model.set_grad_checkpointing(checkpointing)
    for _ in range(2):  # gradients allocated, kernels warm
        model(x).sum().backward()
    gc.collect()
    start = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM)
    model(x).sum().backward()
    print(json.dumps({"estimate": estimate, "peak": status("VmHWM:") - start}))
""")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("checkpointing", ["0", "1"])
def test_the_activation_estimate_is_within_20_percent_of_the_measured_peak_on_the_cpu(checkpointing):
    """A forward and backward with gradients already allocated peaks at the saved activations plus backward's
    transient buffers. glibc returns blocks of 64 KB and more to the system when freed (MALLOC_MMAP_THRESHOLD_),
    so the process's peak resident set follows the tensors alive. Measured here: 0.99-1.02x without
    checkpointing, 1.1-1.15x with it (one block's recomputation plus its gradients)."""
    import json

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", MEASURE, checkpointing], capture_output=True, text=True, env=env,
                         check=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert 0.8 <= result["peak"] / result["estimate"] <= 1.2, result

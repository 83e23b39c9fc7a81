"""Fast exact inference for PoolFormer v1 and v2: `optimize(model)` gives the same logits, faster (and for a
features-only model, the dense tasks' backbone, the same four normalised stage maps).

What lives here:
- `folding`: the algebra. The reference model's weights are rewritten once into a few tensors (norm
  affines, LayerScale, StarReLU folded into the convolutions; the pooling mixer needs only sigma).
- `cpu`: the folded forward made of PyTorch operators: oneDNN's fused primitives on CPUs that run the
  dtype natively, plain operators anywhere else (the portable path).
- `runtime_backends`: the folded graph, made once per input shape, run by OpenVINO (the CPU default: fp32, and bf16
  where the CPU computes it natively; the graph built from OpenVINO's operators in `openvino_graph`, each
  GroupNorm one MVN node) or ONNX Runtime (fp32; the graph exported to ONNX).
- `compiled`: the folded graph as a module of plain operators for torch.compile (inductor with freezing; CPU),
  what `bench --impl fast --compile` runs: the fastest PyTorch form in bf16, after ~10 s of compiling per shape.
- `triton` (a subpackage, one module per job): the GPU path, two fused Triton kernels per block (token mixer; MLP
  with its 4x-wide hidden tile kept on chip, or split around cuBLAS GEMMs, or as two Triton GEMMs carrying the
  norm, activation and residual: autotuning picks per shape) passing exact
  per-sample statistics along, a stem kernel that reads the images as they are; the same kernels run on CPU
  tensors in Triton's interpreter with POOLFORMER_TRITON_INTERPRET=1 (how the tests check them).
- `cuda`: CUDA graphs for repeated input shapes (batch 1 is launch-bound).
- `roofline`: the bytes the kernels move per image, the bandwidth a measured speed implies, and each kernel's
  own time (`time_kernels`).
- `module`: `FastPoolFormer` / `optimize`, which picks the kernels per (dtype, device) from what the
  hardware can do (`poolformer.capabilities`).

Precision: float32 by default; bfloat16/float16 with `optimize(model, dtype=...)` or under torch.autocast,
with statistics accumulated in float32 and the head in float32. Logits are always float32; a backbone's maps
come in the compute dtype (float32 from the OpenVINO and ONNX Runtime backends), their output norms computed
with float32 statistics and affine.
"""

from .folding import FoldedBlock, FoldedModel, FoldedStage, Plan, fold, pool_minus_identity_weight
from .module import BACKEND_ENV, BACKENDS, FastPoolFormer, choose_backend, optimize

__all__ = ["optimize", "FastPoolFormer", "fold", "FoldedModel", "FoldedStage", "FoldedBlock", "Plan",
           "pool_minus_identity_weight", "BACKENDS", "BACKEND_ENV", "choose_backend"]

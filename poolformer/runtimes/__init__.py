"""Deployment runtimes: ONNX export in a form every runtime computes right, and ONNX Runtime and OpenVINO runners.

- `export_forms`: GroupNorm(1) and count_include_pad=False pooling spelled out in portable operators
  (`portable_form`).
- `sessions`: ONNX Runtime / OpenVINO sessions, and `RuntimeModule`, the nn.Module that bench, predict and
  eval run as `--impl onnxruntime` / `--impl openvino` (or with `--weights FILE.onnx`).
- `exporting`: ONNX and pt2 export of a module (a features-only model's four outputs stage1..stage4; optionally
  any input size), and `openvino_converter`, OpenVINO's own conversion of a model (what `--impl openvino` runs).

Nothing here imports the fast path (`poolformer.fast` runs its folded graph on these runtimes, and
`poolformer.export` writes either form to a file). onnxruntime and openvino are imported when a runner is made;
a missing one is a one-line ConfigError.
"""

from .exporting import export_onnx, export_pt2
from .sessions import RUNTIMES, RuntimeModule, available, make_runner

__all__ = ["RUNTIMES", "RuntimeModule", "available", "export_onnx", "export_pt2", "make_runner"]

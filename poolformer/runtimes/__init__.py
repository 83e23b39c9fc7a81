"""Deployment runtimes: ONNX export in a form every runtime computes right, ONNX Runtime and OpenVINO runners,
and parity checks against our fp32 model.

- `export_forms`: GroupNorm(1) and count_include_pad=False pooling spelled out in portable operators
  (`portable_form`), and the fast path's folded model as a plain module (`FoldedExport`).
- `runners`: ONNX Runtime / OpenVINO sessions, and `RuntimeModule`, the nn.Module that bench, predict and
  eval run as `--impl onnxruntime` / `--impl openvino` (or with `--weights FILE.onnx`).
- `exporting`: `export_model`, which writes ONNX, pt2 or OpenVINO IR atomically and only when the file's outputs
  match (a features-only model: four outputs stage1..stage4, each checked; optionally any input size), and
  `openvino_converter`, OpenVINO's own conversion of a model (what `--impl openvino` runs).

onnxruntime and openvino are imported when a runner is made; a missing one is a one-line ConfigError.
"""

from .exporting import FORMATS, ExportReport, ParityCheck, export_model, export_onnx, export_pt2
from .runners import RUNTIMES, RuntimeModule, available, make_runner

__all__ = ["FORMATS", "RUNTIMES", "ExportReport", "ParityCheck", "RuntimeModule", "available", "export_model",
           "export_onnx", "export_pt2", "make_runner"]

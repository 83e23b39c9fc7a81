"""The fast path on Triton kernels: the folded PoolFormer forward in two fused kernels per block, exact
per-sample statistics passed from kernel to kernel, on CUDA GPUs (and in Triton's interpreter on the CPU).

Modules, each one job:
- `availability`: Triton's import and the interpreter switch, why a dtype/device/model is not covered,
  `kernels()` (the kernels module in the process's mode) and the GPU's multiprocessor count.
- `kernels`: the @triton.jit kernels themselves (import them through `availability.kernels()`).
- `weights`: `prepare`, the folded weights as the kernels take them (`TritonModel`, the stem's matrix).
- `tiles`: launch geometry: partial moments, the tiles of the token mixer and of the MLP's three forms
  (`MlpConfig`, `SplitMlp`, `GemmMlp`), and each kernel's candidates in design-time order.
- `autotune`: timing candidate tiles and the tile cache file that keeps the winners between processes.
- `chooser`: `TileChooser`, the tiles one model runs with per shape and what autotuning measured.
- `instrument`: `Recorder`, each launch's bytes and timing marks, inside its contexts only.
- `launches`: one launch of each kernel (or PyTorch operator) on a given tile.
- `forward`: `TritonForward`, the whole forward, asking the chooser for each kernel's tile.

Nothing here keeps state at module level: a `FastPoolFormer` holds its chooser and recorder.
Importing this package imports neither Triton nor the kernels.
"""

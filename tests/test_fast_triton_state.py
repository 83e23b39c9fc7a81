"""Where the Triton path keeps its state: tile choices in a model's `TileChooser`, launch records in its
`Recorder` and only inside their contexts, nothing in module globals; and the GPU facts the launch heuristics
use (multiprocessors, clock) come from the device, not from constants."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import torch

from poolformer import create_model, optimize
from poolformer.fast import roofline
from poolformer.fast.triton import availability, tiles
from poolformer.fast.triton.chooser import KernelShape, TileChooser
from poolformer.fast.triton.forward import TritonForward
from poolformer.fast.triton.instrument import Recorder
from poolformer.fast.triton.tiles import MlpConfig, SplitMlp

from poolformer.model import randomize_

PACKAGE = Path(availability.__file__).parent


def _fake_gpu(monkeypatch, **properties) -> None:
    """torch.cuda.get_device_properties answers with `properties`, as a GPU would."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(**properties))


def test_no_module_of_the_subpackage_keeps_state_at_module_level():
    """No `global` statements, and no module-level list, dict or set except an upper-case constant table."""
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Global, ast.Nonlocal))], path.name
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(
                    node.value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                assert all(isinstance(t, ast.Name) and t.id.isupper() for t in targets), (path.name, node.lineno)


def test_two_choosers_keep_their_own_tiles_and_timings():
    """The same shape in two choosers: each runs and remembers its own tile; neither sees the other's."""
    shape = KernelShape("mlp", 49, 64, torch.float32, torch.device("cpu"), hidden=256)
    first, second = TileChooser(), TileChooser()
    first.launch_with_tile(shape, lambda: [MlpConfig(16, 16, 4, 1)], lambda tile: tile)
    assert second.mlp_tiles_in_use() == [] and second.mlp_form_in_use(49, 64, 256, torch.float32) is None
    launched = second.launch_with_tile(shape, lambda: [SplitMlp(16, 64)], lambda tile: tile)
    assert launched == SplitMlp(16, 64) and second.mlp_form_in_use(49, 64, 256, torch.float32) == launched
    assert first.mlp_form_in_use(49, 64, 256, torch.float32) == MlpConfig(16, 16, 4, 1)
    assert first.autotune_timings() == second.autotune_timings() == {}


def test_two_models_in_one_process_keep_separate_tile_choices(monkeypatch, kernel_device):
    """Two FastPoolFormers on the same shapes, the first made to run the split MLP and the second the fused
    one: each keeps the form it ran (with one process-wide table the second would have reused the first's)."""
    model = randomize_(create_model("s12"), seed=7).eval()
    x = torch.randn(1, 3, 32, 32).to(kernel_device)
    monkeypatch.setenv(tiles.MLP_ENV, "split")
    split = optimize(model, backend="triton")
    with torch.no_grad():
        split(x)
    monkeypatch.setenv(tiles.MLP_ENV, "fused")
    fused = optimize(model, backend="triton")
    with torch.no_grad():
        fused(x)
    assert {t["kind"] for t in split.tiles.mlp_tiles_in_use()} == {"SplitMlp"}
    assert {t["kind"] for t in fused.tiles.mlp_tiles_in_use()} == {"MlpConfig"}
    shapes = [(t["rows"], t["channels"]) for t in split.tiles.mlp_tiles_in_use()]
    assert shapes == [(t["rows"], t["channels"]) for t in fused.tiles.mlp_tiles_in_use()] and len(shapes) == 4


def test_a_recording_lists_its_own_forward_inside_its_context_only(kernel_device):
    """Launches go to the recorder of the forward that made them, only while its context is open; a nested
    context takes them over and hands back to the outer one."""
    x = torch.randn(1, 4, 4, 16).to(kernel_device)
    first, second = TritonForward(TileChooser(), Recorder()), TritonForward(TileChooser(), Recorder())
    with first.recorder.record_traffic() as recorded, second.recorder.mark_launches(x.device) as marks:
        first.stage_input_stats(x)
        with first.recorder.record_traffic() as inner:
            first.stage_input_stats(x)
        first.stage_input_stats(x)
    first.stage_input_stats(x)
    second.stage_input_stats(x)
    assert [k.name for k in recorded] == ["stats", "stats"] and [k.name for k in inner] == ["stats"]
    assert [m.name for m in marks] == ["start"]  # the second forward launched nothing inside its context


def test_the_sm_count_comes_from_the_device(monkeypatch):
    """The GPU's own multiprocessor count, where its properties give one; a fixed reference on the CPU."""
    assert availability.multiprocessor_count(torch.device("cpu")) == availability.REFERENCE_SM_COUNT
    _fake_gpu(monkeypatch, multi_processor_count=16)
    assert availability.multiprocessor_count(torch.device("cuda")) == 16


def test_the_mlp_order_follows_the_sm_count(monkeypatch):
    """1,568 rows (batch 8, s12's stage 3 at 224 px) fill a 16-SM GPU's 64-row tiles but not a 132-SM one's: the
    split form goes first on the small GPU only, and the roofline of a forward there counts that form."""
    monkeypatch.delenv(tiles.MLP_ENV, raising=False)
    assert isinstance(tiles.mlp_candidates(1568, 320, 1280, torch.bfloat16, sm_count=16)[0], SplitMlp)
    assert isinstance(tiles.mlp_candidates(1568, 320, 1280, torch.bfloat16, sm_count=132)[0], MlpConfig)
    fast = optimize(create_model("s12"))
    monkeypatch.setattr(availability, "unavailable_reason", lambda dtype, device: None)  # as on a GPU
    monkeypatch.setattr(availability, "triton_interprets", lambda: False)  # compiled kernels
    _fake_gpu(monkeypatch, multi_processor_count=16)
    moved = fast.bytes_per_image(8, 224, 224, torch.bfloat16, "cuda")
    small, large = (roofline.bytes_per_image(roofline.fast_traffic(
        fast.folded, fast.plan, 8, 224, 224, torch.bfloat16, sm_count=count), 8) for count in (16, 132))
    assert moved == small != large


def test_time_kernels_sleeps_by_the_gpus_own_clock(monkeypatch):
    """torch.cuda._sleep counts cycles: the queue-ahead time is the device's clock_rate (kHz = cycles per ms)
    times the milliseconds, with a named fallback where torch does not report the clock."""
    _fake_gpu(monkeypatch, clock_rate=1_410_000)
    assert roofline.gpu_cycles_per_ms(torch.device("cuda")) == 1_410_000
    _fake_gpu(monkeypatch)
    assert roofline.gpu_cycles_per_ms(torch.device("cuda")) == roofline.FALLBACK_GPU_CYCLES_PER_MS

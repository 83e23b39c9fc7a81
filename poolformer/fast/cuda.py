"""CUDA graphs for the fast module: at small batches a forward is bound by kernel launches (about 40 for
poolformer_s12), not by the GPU, so repeated shapes are captured once and replayed as one launch.

`GraphCache` keeps one captured graph per key (input shape, input dtype, device and whatever else the caller
puts in the key, e.g. the compute dtype) after `warmup_calls` ordinary calls with that key (the first calls
compile the Triton kernels and let cuDNN pick its algorithms; neither may happen during a capture). A graph
reads from a static input buffer and writes to static output buffers (one tensor, or a list: a features-only
model's maps), so each call copies the caller's input in (the caller may reuse or change its tensor
afterwards) and returns copies of the outputs (the next replay overwrites the buffers). Graphs hold their
own memory pool, so at most `max_graphs` are kept (least recently used dropped first).

POOLFORMER_CUDA_GRAPHS=0 (or `optimize(..., cuda_graphs=False)`) turns graphs off, for debugging.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

GRAPHS_ENV = "POOLFORMER_CUDA_GRAPHS"
WARMUP_CALLS = 2
MAX_GRAPHS = 8

Output = torch.Tensor | list[torch.Tensor]
Forward = Callable[[torch.Tensor], Output]


def graphs_enabled_by_env() -> bool:
    """POOLFORMER_CUDA_GRAPHS (on unless set to 0/false/no/off; see poolformer.settings)."""
    from .. import settings

    return settings.flag(GRAPHS_ENV)


@dataclass
class CapturedGraph:
    """A replayable computation: replay() recomputes `static_output` from `static_input` in place."""

    static_input: torch.Tensor
    static_output: Output
    replay: Callable[[], None]


def capture_cuda_graph(forward: Forward, example: torch.Tensor) -> CapturedGraph:
    """Capture `forward` on a static copy of `example` as a CUDA graph (after one run on a side stream, as
    PyTorch's documentation asks, so that lazy initialisation happens outside the capture)."""
    with torch.inference_mode(False):  # an ordinary tensor: copy_ into it works in and out of inference mode
        static_input = torch.empty_like(example)
    static_input.copy_(example)
    side = torch.cuda.Stream(device=example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(side):
        forward(static_input)
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = forward(static_input)
    return CapturedGraph(static_input, static_output, graph.replay)


Capture = Callable[[Forward, torch.Tensor], CapturedGraph]


class GraphCache:
    """Runs `forward(x)` eagerly for the first `warmup_calls` calls of each key, then captures it once and
    replays the graph for every later call with that key."""

    def __init__(self, capture: Capture = capture_cuda_graph, warmup_calls: int = WARMUP_CALLS,
                 max_graphs: int = MAX_GRAPHS):
        self.capture = capture
        self.warmup_calls = warmup_calls
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, CapturedGraph] = OrderedDict()
        self.calls: dict[Hashable, int] = {}
        self.captures = 0  # how many graphs were captured so far (dropped ones included)

    @staticmethod
    def key(x: torch.Tensor, extra: Hashable = None) -> Hashable:
        return tuple(x.shape), x.dtype, x.device, extra

    def __call__(self, forward: Forward, x: torch.Tensor, extra: Hashable = None) -> Output:
        key = self.key(x, extra)
        graph = self.graphs.get(key)
        if graph is None:
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] <= self.warmup_calls:
                return forward(x)
            graph = self.capture(forward, x)
            self.captures += 1
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:
                dropped, _ = self.graphs.popitem(last=False)
                self.calls.pop(dropped, None)
        self.graphs.move_to_end(key)
        graph.static_input.copy_(x)
        graph.replay()
        if isinstance(graph.static_output, list):
            return [t.clone() for t in graph.static_output]
        return graph.static_output.clone()

    def clear(self) -> None:
        self.graphs.clear()
        self.calls.clear()

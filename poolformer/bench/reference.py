"""The reference workload of normalised mode: a fixed plain-torch network timed beside every model step, so a
row's speed can be divided by the machine's speed at that moment (poolformer.regression)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..sizes import Size


class _ReferenceBlock(nn.Module):
    """x + mlp(norm(x)) after x + (pool(norm(x)) - norm(x)): a pooling block written with plain torch ops."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(1, dim), nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.pool(y) - y
        return x + self.mlp(self.norm2(x))


def reference_workload(device: str, batch_size: int, resolution: Size | int) -> Callable[[], Any]:
    """A fixed plain-torch network, independent of this package's code: a half-depth PoolFormer-S12 (7x7/4
    stem, pooling blocks at 64/128/320/512 channels with depths 1/1/3/1, 3x3/2 downsampling) on an fp32 input
    [batch_size, 3, height, width] (`resolution`; an int is a square). Same op mix as the models, so a busy or
    slow machine affects it the way it affects them (a simpler workload was measured to react differently, e.g. to a neighbour on
    the same core); scaled with the configuration, so each model step is paired with a reference run of
    similar length. Its speed tracks the machine and torch, not our code. See BenchSettings.normalised."""
    generator = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, stride=4, padding=2)]
    for stage, (dim, depth) in enumerate(zip((64, 128, 320, 512), (1, 1, 3, 1))):
        if stage > 0:
            layers.append(nn.Conv2d(layers[-1].norm1.num_channels, dim, 3, stride=2, padding=1))
        layers.extend(_ReferenceBlock(dim) for _ in range(depth))
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    net = net.to(device)
    size = Size.of(resolution)
    x = torch.randn(batch_size, 3, size.height, size.width, generator=generator).to(device)
    device_type = torch.device(device).type

    def run() -> None:
        # always fp32 and channels-first: it runs interleaved inside the model's autocast region
        with torch.inference_mode(), torch.autocast(device_type, enabled=False):
            net(x)

    return run

"""The Triton kernels of the folded PoolFormer (v1 and v2); `poolformer.fast.triton.launches` launches them.
Import it through `availability.kernels()`, which makes POOLFORMER_TRITON_INTERPRET=1 take effect first
(Triton decides between compiling and interpreting when it decorates, reading TRITON_INTERPRET).

Every activation is a channels-last matrix [R, C]: R = B*H*W token rows, C contiguous channels. A program
owns a *slot* of consecutive rows (a slot may run across samples). Per-sample statistics never need a pass
of their own: each kernel that writes an activation also writes, per slot, centred partial moments
(count, mean, M2 = sum of squared deviations from that mean) of every sample the slot touches ("segment"),
in float32 [slots, SEGS, 3]. The kernel that needs the sample's statistics next combines those partials
exactly (Chan et al.: total mean = count-weighted mean of the means; M2 = sum M2_i + n_i (mean_i - mean)^2),
so nothing is ever computed as E[x^2] - E[x]^2.

Numerics: loads are converted to float32; pooling, statistics, scales, residuals and the matmuls' sums are
float32; the matmul operands are the compute dtype (float32 with input_precision="ieee": no TF32).
Triton's interpreter multiplies bfloat16 dot operands as raw integers (triton 3.8), so there (DOT_UPCAST)
the operands, already rounded to bfloat16, are widened to float32 first: the same products, exactly.
"""

import triton
import triton.language as tl

ACT_GELU, ACT_RELU, ACT_SILU, ACT_RELU_SQUARED, ACT_GELU_POLY = 0, 1, 2, 3, 4  # codes of the ACT constexpr


@triton.jit
def _segment_stats(y, valid, seg, SEGS: tl.constexpr):
    """Centred moments per segment of a tile y [BR, BC] (float32), only where `valid` [BR, BC]; seg [BR] is
    each row's segment in [0, SEGS). Returns count, mean, M2, each [SEGS]."""
    onehot = (seg[:, None] == tl.arange(0, SEGS)[None, :]).to(tl.float32)  # [BR, SEGS]
    row_count = tl.sum(valid.to(tl.float32), axis=1)
    row_sum = tl.sum(tl.where(valid, y, 0.0), axis=1)
    count = tl.sum(onehot * row_count[:, None], axis=0)
    mean = tl.sum(onehot * row_sum[:, None], axis=0) / tl.maximum(count, 1.0)
    row_mean = tl.sum(onehot * mean[None, :], axis=1)
    deviation = tl.where(valid, y - row_mean[:, None], 0.0)
    m2 = tl.sum(onehot * tl.sum(deviation * deviation, axis=1)[:, None], axis=0)
    return count, mean, m2


@triton.jit
def _merge_stats(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's parallel combination of two sets of centred moments (elementwise; empty sets are fine)."""
    count = count_a + count_b
    delta = mean_b - mean_a
    share_b = count_b / tl.maximum(count, 1.0)
    return count, mean_a + delta * share_b, m2_a + m2_b + delta * delta * count_a * share_b


@triton.jit
def _store_stats(part_ptr, slot, count, mean, m2, SEGS: tl.constexpr):
    offsets = (slot * SEGS + tl.arange(0, SEGS)) * 3
    tl.store(part_ptr + offsets, count)
    tl.store(part_ptr + offsets + 1, mean)
    tl.store(part_ptr + offsets + 2, m2)


@triton.jit
def _sample_moments(part_ptr, sample, sample_ok, HW, SLOT_ROWS, eps, SEGS: tl.constexpr,
                    MAX_SLOTS: tl.constexpr):
    """Mean and 1/sqrt(var + eps) over all of each sample's elements, for samples [S] (int), from a producer's
    partials (its SLOT_ROWS rows per slot, SEGS segments per slot; one sample's rows touch at most MAX_SLOTS
    slots). Returns mean [S], inv_sigma [S]."""
    first = (sample * HW) // SLOT_ROWS
    last = ((sample + 1) * HW - 1) // SLOT_ROWS
    slot = first[:, None] + tl.arange(0, MAX_SLOTS)[None, :]  # [S, MAX_SLOTS]
    ok = (slot <= last[:, None]) & sample_ok[:, None]
    segment = sample[:, None] - (slot * SLOT_ROWS) // HW
    base = (slot * SEGS + segment) * 3
    count = tl.load(part_ptr + base, mask=ok, other=0.0)
    means = tl.load(part_ptr + base + 1, mask=ok, other=0.0)
    m2s = tl.load(part_ptr + base + 2, mask=ok, other=0.0)
    total = tl.maximum(tl.sum(count, axis=1), 1.0)
    mean = tl.sum(count * means, axis=1) / total
    spread = tl.where(ok, means - mean[:, None], 0.0)
    m2 = tl.sum(m2s, axis=1) + tl.sum(count * spread * spread, axis=1)
    return mean, 1.0 / tl.sqrt(m2 / total + eps)


@triton.jit
def _per_row(values, seg, SEGS: tl.constexpr):
    """values [SEGS] -> [BR]: each row's segment's value."""
    onehot = (seg[:, None] == tl.arange(0, SEGS)[None, :]).to(tl.float32)
    return tl.sum(onehot * values[None, :], axis=1)


@triton.jit
def _no_moments(SEGS: tl.constexpr):
    """count, mean and M2 of nothing yet, for SEGS segments (the start of a slot's running moments)."""
    zero = tl.zeros([SEGS], dtype=tl.float32)
    return zero, zero, zero


@triton.jit
def _slot_input_moments(in_part_ptr, R, HW, SLOT_ROWS, IN_SLOT_ROWS, eps, SEGS: tl.constexpr,
                        IN_SEGS: tl.constexpr, IN_MAX_SLOTS: tl.constexpr):
    """This program's first row, the first sample its slot touches, and the mean and 1/sigma [SEGS] of every
    sample it touches, from the partials its producer wrote."""
    row0 = tl.program_id(0) * SLOT_ROWS
    first_sample = row0 // HW
    samples = first_sample + tl.arange(0, SEGS)
    mean, inv_sigma = _sample_moments(in_part_ptr, samples, samples * HW < R, HW, IN_SLOT_ROWS, eps,
                                      IN_SEGS, IN_MAX_SLOTS)
    return row0, first_sample, mean, inv_sigma


@triton.jit
def stats_kernel(x_ptr, part_ptr, R, HW, C, SLOT_ROWS,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SEGS: tl.constexpr):
    """Partials of x [R, C] (the input of a stage's first block, written by a cuDNN convolution)."""
    slot = tl.program_id(0)
    row0 = slot * SLOT_ROWS
    first_sample = row0 // HW
    count, mean, m2 = _no_moments(SEGS)
    for tile in range(0, SLOT_ROWS, BLOCK_R):
        rows = row0 + tile + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        seg = rows // HW - first_sample
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            valid = row_ok[:, None] & (cols < C)[None, :]
            y = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            c_count, c_mean, c_m2 = _segment_stats(y, valid, seg, SEGS)
            count, mean, m2 = _merge_stats(count, mean, m2, c_count, c_mean, c_m2)
    _store_stats(part_ptr, slot, count, mean, m2, SEGS)


@triton.jit
def stem_kernel(x_ptr, w_ptr, b_ptr, y_ptr, B, H, W, HO, WO, N, stride_b, stride_c, stride_h, stride_w,
                CIN: tl.constexpr, KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """The stem convolution (KSIZE x KSIZE, stride STRIDE, padding PAD, CIN input channels) as an implicit GEMM
    straight from the caller's images: x is read through its strides in its own dtype (float32 NCHW as users
    pass it) and rounded to the weights' dtype as it is loaded, so the input needs no conversion pass. w [K_PAD,
    N] holds the weights in (ky, kx, ci) order, zero past K; y [B*HO*WO, N] is channels-last, in w's dtype; the
    bias is float32. It replaces cuDNN's convolution, slow with 3 input channels, and its conversion pass
    (benchmarks/results/gpu/README.md)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B * HO * WO
    sample = rows // (HO * WO)
    oy = (rows // WO) % HO
    ox = rows % WO
    base = sample.to(tl.int64) * stride_b
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dot_dtype = w_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.static_range(0, K_PAD, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ci = k % CIN
        kx = (k // CIN) % KSIZE
        ky = k // (CIN * KSIZE)
        iy = oy[:, None] * STRIDE - PAD + ky[None, :]
        ix = ox[:, None] * STRIDE - PAD + kx[None, :]
        inside = (row_ok[:, None] & (k < CIN * KSIZE * KSIZE)[None, :] & (iy >= 0) & (iy < H) & (ix >= 0)
                  & (ix < W))
        patch = tl.load(x_ptr + base[:, None] + ci[None, :] * stride_c + iy * stride_h + ix * stride_w,
                        mask=inside, other=0.0).to(dot_dtype)
        weight = tl.load(w_ptr + k[:, None] * N + cols[None, :], mask=col_ok[None, :], other=0.0)
        if DOT_UPCAST:
            patch = patch.to(tl.float32)
            weight = weight.to(tl.float32)
        acc = tl.dot(patch, weight, acc, input_precision=PRECISION)
    acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def layer_norm_kernel(x_ptr, y_ptr, w_ptr, R, C, eps,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr):
    """LayerNorm over the channels of x [R, C] (v2's stem and downsampling norms; no bias after folding), rows
    of BLOCK_R at a time with all C (<= BLOCK_C) channels in registers: the mean, then the centred variance, in
    float32 (PyTorch's LayerNorm was far from the memory bound at C = 64: benchmarks/results/gpu/README.md)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    valid = (rows < R)[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(valid, x - mean[:, None], 0.0)
    inv_sigma = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    y = centred * inv_sigma[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _mixer_rows(rows, R, HW, H, W, C, RADIUS: tl.constexpr):
    """Per row of a token-mixer tile: whether it exists, its offset in x, its (h, w) and 1 / (positions of its
    window inside the map)."""
    token = rows % HW
    h = token // W
    w = token % W
    window = ((tl.minimum(h + RADIUS, H - 1) - tl.maximum(h - RADIUS, 0) + 1)
              * (tl.minimum(w + RADIUS, W - 1) - tl.maximum(w - RADIUS, 0) + 1))
    return rows < R, rows.to(tl.int64) * C, h, w, 1.0 / window.to(tl.float32)


@triton.jit
def _mix_chunk(x_ptr, y_ptr, mix_scale_ptr, skip_ptr, row_ok, row_offsets, h, w, inv_window, row_inv_sigma, c0,
               H, W, C, POOL: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = skip * x + (mix_scale / sigma) * (pool(x) - x) for channels c0:c0+BLOCK_C of a tile's rows, stored;
    returns y as stored (in float32, 0 outside the matrix) and where it is valid."""
    RADIUS: tl.constexpr = POOL // 2
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    valid = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + row_offsets[:, None] + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for dy in tl.static_range(POOL):
        inside_h = (h + dy - RADIUS >= 0) & (h + dy - RADIUS < H)
        for dx in tl.static_range(POOL):
            if dy == RADIUS and dx == RADIUS:  # the window's centre is x itself: loaded once
                total += x
            else:
                inside = row_ok & inside_h & (w + dx - RADIUS >= 0) & (w + dx - RADIUS < W)
                shift = ((dy - RADIUS) * W + (dx - RADIUS)) * C
                total += tl.load(x_ptr + row_offsets[:, None] + shift + cols[None, :],
                                 mask=inside[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    scale = tl.load(mix_scale_ptr + cols, mask=col_ok, other=0.0)[None, :] * row_inv_sigma[:, None]
    skip = x
    if HAS_SKIP:
        skip = x * tl.load(skip_ptr + cols, mask=col_ok, other=0.0)[None, :]
    y = (skip + scale * (total * inv_window[:, None] - x)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row_offsets[:, None] + cols[None, :], y, mask=valid)
    return y.to(tl.float32), valid


@triton.jit
def pool_mix_kernel(x_ptr, y_ptr, in_part_ptr, out_part_ptr, mix_scale_ptr, skip_ptr,
                    R, H, W, C, SLOT_ROWS, IN_SLOT_ROWS, eps,
                    POOL: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    SEGS: tl.constexpr, IN_SEGS: tl.constexpr, IN_MAX_SLOTS: tl.constexpr,
                    WHOLE_SLOTS: tl.constexpr):
    """The token mixer, one read and one write of x [R, C]:
    y = skip * x + (mix_scale_c / sigma_b) * (avg_pool_POOLxPOOL(x) - x), the average over the window's
    positions inside the map (count_include_pad=False); sigma_b from the partials of x. Writes y's partials.
    WHOLE_SLOTS: a slot that lies inside one sample and whose tiles have no masked lanes (C a multiple of
    BLOCK_C) sums y - K and its square elementwise in registers, K the mean of its first chunk, and reduces
    across rows once at its end: no reduction across warps (shared memory, barriers) per tile. Its moments
    are mean = K + S1 / n and M2 = S2 - S1^2 / n, where S1 / n is small against the spread (K is a mean of
    hundreds of the slot's own values). Other slots take the per-tile way: centred partial moments per tile."""
    RADIUS: tl.constexpr = POOL // 2
    HW = H * W
    row0, first_sample, _, inv_sigma = _slot_input_moments(in_part_ptr, R, HW, SLOT_ROWS, IN_SLOT_ROWS, eps,
                                                           SEGS, IN_SEGS, IN_MAX_SLOTS)
    whole = WHOLE_SLOTS and C % BLOCK_C == 0 and row0 + SLOT_ROWS <= R
    if whole and (row0 + SLOT_ROWS - 1) // HW == first_sample:
        sample_inv_sigma = tl.sum(tl.where(tl.arange(0, SEGS) == 0, inv_sigma, 0.0), axis=0)
        shift = sample_inv_sigma * 0.0  # a float32 scalar: the first chunk's mean below
        s1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for tile in range(0, SLOT_ROWS, BLOCK_R):
            row_ok, row_offsets, h, w, inv_window = _mixer_rows(row0 + tile + tl.arange(0, BLOCK_R), R, HW, H, W,
                                                                C, RADIUS)
            row_inv_sigma = tl.zeros([BLOCK_R], dtype=tl.float32) + sample_inv_sigma
            for c0 in range(0, C, BLOCK_C):
                y, unmasked = _mix_chunk(x_ptr, y_ptr, mix_scale_ptr, skip_ptr, row_ok, row_offsets, h, w,
                                         inv_window, row_inv_sigma, c0, H, W, C, POOL, HAS_SKIP, BLOCK_R, BLOCK_C)
                # every lane is valid here (see `whole`), so the sums below need no mask
                if tile == 0 and c0 == 0:
                    shift = tl.sum(tl.sum(y, axis=1), axis=0) / (BLOCK_R * BLOCK_C)
                deviation = y - shift
                s1 += deviation
                s2 += deviation * deviation
        n = (SLOT_ROWS * C).to(tl.float32)
        total_s1 = tl.sum(tl.sum(s1, axis=1), axis=0)
        offset = total_s1 / n
        first = tl.arange(0, SEGS) == 0
        count = tl.where(first, n, 0.0)
        mean = tl.where(first, shift + offset, 0.0)
        m2 = tl.where(first, tl.maximum(tl.sum(tl.sum(s2, axis=1), axis=0) - total_s1 * offset, 0.0), 0.0)
    else:
        count, mean, m2 = _no_moments(SEGS)
        for tile in range(0, SLOT_ROWS, BLOCK_R):
            rows = row0 + tile + tl.arange(0, BLOCK_R)
            seg = rows // HW - first_sample
            row_ok, row_offsets, h, w, inv_window = _mixer_rows(rows, R, HW, H, W, C, RADIUS)
            row_inv_sigma = _per_row(inv_sigma, seg, SEGS)
            for c0 in range(0, C, BLOCK_C):
                y, valid = _mix_chunk(x_ptr, y_ptr, mix_scale_ptr, skip_ptr, row_ok, row_offsets, h, w, inv_window,
                                      row_inv_sigma, c0, H, W, C, POOL, HAS_SKIP, BLOCK_R, BLOCK_C)
                c_count, c_mean, c_m2 = _segment_stats(y, valid, seg, SEGS)
                count, mean, m2 = _merge_stats(count, mean, m2, c_count, c_mean, c_m2)
    _store_stats(out_part_ptr, tl.program_id(0), count, mean, m2, SEGS)


@triton.jit
def mlp_norm_kernel(x_ptr, xn_ptr, base_ptr, in_part_ptr, skip_ptr, b2_ptr, R, HW, C, SLOT_ROWS, IN_SLOT_ROWS, eps,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SEGS: tl.constexpr, IN_SEGS: tl.constexpr,
                    IN_MAX_SLOTS: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_B2: tl.constexpr,
                    WRITE_BASE: tl.constexpr):
    """The elementwise half of the split MLP (the GEMMs run on cuBLAS), one read of x [R, C]: writes
    xn = (x - mu_b) / sigma_b, fc1's operand, and when WRITE_BASE the residual base skip * x + b2 that fc2's
    GEMM adds its product to (without skip and bias the base is x itself and nothing is written)."""
    row0, first_sample, mean_in, inv_sigma = _slot_input_moments(in_part_ptr, R, HW, SLOT_ROWS, IN_SLOT_ROWS, eps,
                                                                 SEGS, IN_SEGS, IN_MAX_SLOTS)
    for tile in range(0, SLOT_ROWS, BLOCK_R):
        rows = row0 + tile + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        seg = rows // HW - first_sample
        row_mean = _per_row(mean_in, seg, SEGS)[:, None]
        row_inv_sigma = _per_row(inv_sigma, seg, SEGS)[:, None]
        row_offsets = rows.to(tl.int64) * C
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            valid = row_ok[:, None] & col_ok[None, :]
            offsets = row_offsets[:, None] + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            tl.store(xn_ptr + offsets, ((x - row_mean) * row_inv_sigma).to(xn_ptr.dtype.element_ty), mask=valid)
            if WRITE_BASE:
                base = x
                if HAS_SKIP:
                    base = base * tl.load(skip_ptr + cols, mask=col_ok, other=0.0)[None, :]
                if HAS_B2:
                    base = base + tl.load(b2_ptr + cols, mask=col_ok, other=0.0)[None, :]
                tl.store(base_ptr + offsets, base.to(base_ptr.dtype.element_ty), mask=valid)


@triton.jit
def group_norm_kernel(x_ptr, y_ptr, in_part_ptr, w_ptr, b_ptr, R, HW, C, SLOT_ROWS, IN_SLOT_ROWS, eps,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SEGS: tl.constexpr, IN_SEGS: tl.constexpr,
                      IN_MAX_SLOTS: tl.constexpr, HAS_B: tl.constexpr):
    """A features-only model's output norm, GroupNorm(1) of a stage's map x [R, C], one read and one write:
    y = w_c * (x - mu_b) / sigma_b + b_c, with mu_b and sigma_b from the partials of x that the stage's last
    block wrote (no pass of its own for the statistics). y goes to a new buffer: the next stage reads x."""
    row0, first_sample, mean_in, inv_sigma = _slot_input_moments(in_part_ptr, R, HW, SLOT_ROWS, IN_SLOT_ROWS, eps,
                                                                 SEGS, IN_SEGS, IN_MAX_SLOTS)
    for tile in range(0, SLOT_ROWS, BLOCK_R):
        rows = row0 + tile + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        seg = rows // HW - first_sample
        row_mean = _per_row(mean_in, seg, SEGS)[:, None]
        row_inv_sigma = _per_row(inv_sigma, seg, SEGS)[:, None]
        row_offsets = rows.to(tl.int64) * C
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            valid = row_ok[:, None] & col_ok[None, :]
            offsets = row_offsets[:, None] + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            y = (x - row_mean) * row_inv_sigma * tl.load(w_ptr + cols, mask=col_ok, other=0.0)[None, :]
            if HAS_B:
                y += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
            tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _activation(h, ACT: tl.constexpr):
    if ACT == 0:  # GELU, exact (erf) form
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 1:
        h = tl.maximum(h, 0.0)
    elif ACT == 2:  # SiLU
        h = h / (1.0 + tl.exp(-h))
    elif ACT == 3:  # StarReLU after folding: relu(h)^2 (its scale and bias live in fc2)
        h = tl.maximum(h, 0.0)
        h = h * h
    else:  # GELU with erf from Abramowitz & Stegun 7.1.26 (|error| < 5e-7 in float32): branch-free, one exp and
        # one division instead of libdevice's erff; for timing against it (POOLFORMER_TRITON_GELU=poly)
        a = tl.abs(h) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.3275911 * a)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        erf_abs = 1.0 - poly * tl.exp(-a * a)
        h = 0.5 * h * (1.0 + tl.where(h < 0, -erf_abs, erf_abs))
    return h


@triton.jit
def activation_kernel(h_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """The split MLP's activation in place on h [N] (fc1's output), one read and one write, in float32."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < N
    h = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + offsets, _activation(h, ACT).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_rows(x_ptr, row_offsets, row_ok, C, c0, WIDTH: tl.constexpr):
    """x[rows, c0:c0+WIDTH] as float32 [BR, WIDTH] (zero outside the matrix), and where it is valid."""
    cols = c0 + tl.arange(0, WIDTH)
    valid = row_ok[:, None] & (cols < C)[None, :]
    return tl.load(x_ptr + row_offsets[:, None] + cols[None, :], mask=valid, other=0.0).to(tl.float32), valid


@triton.jit
def _residual_out(x_ptr, y_ptr, skip_ptr, b2_ptr, acc, row_offsets, row_ok, C, c0,
                  WIDTH: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_B2: tl.constexpr):
    """Store skip * x + acc + b2 for columns c0:c0+WIDTH; returns the stored values (float32) and validity."""
    x, valid = _load_rows(x_ptr, row_offsets, row_ok, C, c0, WIDTH)
    cols = c0 + tl.arange(0, WIDTH)
    col_ok = cols < C
    if HAS_SKIP:
        x = x * tl.load(skip_ptr + cols, mask=col_ok, other=0.0)[None, :]
    y = x + acc
    if HAS_B2:
        y += tl.load(b2_ptr + cols, mask=col_ok, other=0.0)[None, :]
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row_offsets[:, None] + cols[None, :], y, mask=valid)
    return y.to(tl.float32), valid


@triton.jit
def mlp_kernel(x_ptr, y_ptr, in_part_ptr, out_part_ptr, w1_ptr, b1_ptr, colsum_ptr, w2_ptr, b2_ptr, skip_ptr,
               R, HW, C, D, SLOT_ROWS, IN_SLOT_ROWS, eps,
               CA: tl.constexpr, CB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
               SEGS: tl.constexpr, IN_SEGS: tl.constexpr, IN_MAX_SLOTS: tl.constexpr,
               ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_SKIP: tl.constexpr,
               EMIT_STATS: tl.constexpr, NORM_AFTER_FC1: tl.constexpr, PRECISION: tl.constexpr,
               DOT_UPCAST: tl.constexpr):
    """The block's second half for rows of x [R, C], the D-wide hidden tile never leaving the chip:
    y = skip * x + fc2(act(fc1((x - mu_b) / sigma_b))) with w1 [C, D] (norm2's affine folded in) and
    w2 [D, C] (LayerScale folded in), both in the compute dtype. C = CA + CB' with CA a power of two and the
    rest (CB' <= CB, a power of two or 0) masked, so channel counts like 320 = 256 + 64 waste nothing.
    mu_b and sigma_b come from the partials of x; y's partials are written when EMIT_STATS.
    NORM_AFTER_FC1 (bf16/fp16): fc1 multiplies x as stored, and the statistics are applied to its sums,
    (x @ w1 - mu_b * colsum) / sigma_b with colsum [D] = the column sums of w1 (float32)."""
    row0, first_sample, mean_in, inv_sigma = _slot_input_moments(in_part_ptr, R, HW, SLOT_ROWS, IN_SLOT_ROWS, eps,
                                                                 SEGS, IN_SEGS, IN_MAX_SLOTS)
    count, mean, m2 = _no_moments(SEGS)
    dot_dtype = w1_ptr.dtype.element_ty
    for tile in range(0, SLOT_ROWS, BLOCK_R):
        rows = row0 + tile + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        seg = rows // HW - first_sample
        row_offsets = rows.to(tl.int64) * C
        row_mean = _per_row(mean_in, seg, SEGS)[:, None]
        row_inv_sigma = _per_row(inv_sigma, seg, SEGS)[:, None]
        if NORM_AFTER_FC1:  # x as stored: the matmul's operand straight from memory
            channels_a = tl.arange(0, CA)
            xa = tl.load(x_ptr + row_offsets[:, None] + channels_a[None, :], mask=row_ok[:, None], other=0.0)
            row_shift = row_mean * row_inv_sigma
        else:
            xa, valid_a = _load_rows(x_ptr, row_offsets, row_ok, C, 0, CA)
            xa = tl.where(valid_a, (xa - row_mean) * row_inv_sigma, 0.0).to(dot_dtype)
        acc_a = tl.zeros([BLOCK_R, CA], dtype=tl.float32)
        if CB > 0:
            if NORM_AFTER_FC1:
                channels_b = CA + tl.arange(0, CB)
                xb = tl.load(x_ptr + row_offsets[:, None] + channels_b[None, :],
                             mask=row_ok[:, None] & (channels_b < C)[None, :], other=0.0)
            else:
                xb, valid_b = _load_rows(x_ptr, row_offsets, row_ok, C, CA, CB)
                xb = tl.where(valid_b, (xb - row_mean) * row_inv_sigma, 0.0).to(dot_dtype)
            acc_b = tl.zeros([BLOCK_R, CB], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            hidden_cols = d0 + tl.arange(0, BLOCK_D)
            hidden_ok = hidden_cols < D
            channels_a = tl.arange(0, CA)
            w1a = tl.load(w1_ptr + channels_a[:, None] * D + hidden_cols[None, :], mask=hidden_ok[None, :], other=0.0)
            h = _dot(xa, w1a, tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32), PRECISION, DOT_UPCAST)
            if CB > 0:
                channels_b = CA + tl.arange(0, CB)
                w1b = tl.load(w1_ptr + channels_b[:, None] * D + hidden_cols[None, :],
                              mask=(channels_b < C)[:, None] & hidden_ok[None, :], other=0.0)
                h = _dot(xb, w1b, h, PRECISION, DOT_UPCAST)
            if NORM_AFTER_FC1:
                colsum = tl.load(colsum_ptr + hidden_cols, mask=hidden_ok, other=0.0)[None, :]
                h = h * row_inv_sigma - row_shift * colsum
            if HAS_B1:
                h += tl.load(b1_ptr + hidden_cols, mask=hidden_ok, other=0.0)[None, :]
            hidden = _activation(h, ACT).to(dot_dtype)
            w2a = tl.load(w2_ptr + hidden_cols[:, None] * C + channels_a[None, :], mask=hidden_ok[:, None], other=0.0)
            acc_a = _dot(hidden, w2a, acc_a, PRECISION, DOT_UPCAST)
            if CB > 0:
                w2b = tl.load(w2_ptr + hidden_cols[:, None] * C + channels_b[None, :],
                              mask=hidden_ok[:, None] & (channels_b < C)[None, :], other=0.0)
                acc_b = _dot(hidden, w2b, acc_b, PRECISION, DOT_UPCAST)
        # the residual is re-read here rather than kept in registers beside the accumulators (an L2 hit)
        ya, valid_a = _residual_out(x_ptr, y_ptr, skip_ptr, b2_ptr, acc_a, row_offsets, row_ok, C, 0, CA,
                                    HAS_SKIP, HAS_B2)
        if EMIT_STATS:
            c_count, c_mean, c_m2 = _segment_stats(ya, valid_a, seg, SEGS)
            count, mean, m2 = _merge_stats(count, mean, m2, c_count, c_mean, c_m2)
        if CB > 0:
            yb, valid_b = _residual_out(x_ptr, y_ptr, skip_ptr, b2_ptr, acc_b, row_offsets, row_ok, C, CA, CB,
                                        HAS_SKIP, HAS_B2)
            if EMIT_STATS:
                c_count, c_mean, c_m2 = _segment_stats(yb, valid_b, seg, SEGS)
                count, mean, m2 = _merge_stats(count, mean, m2, c_count, c_mean, c_m2)
    if EMIT_STATS:
        _store_stats(out_part_ptr, tl.program_id(0), count, mean, m2, SEGS)


@triton.jit
def fc1_kernel(x_ptr, w1_ptr, b1_ptr, h_ptr, in_part_ptr, R, HW, C, D, IN_SLOT_ROWS, eps,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEGS: tl.constexpr,
               IN_SEGS: tl.constexpr, IN_MAX_SLOTS: tl.constexpr, ACT: tl.constexpr, HAS_B1: tl.constexpr,
               PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """fc1 of the GEMM form of the MLP, one [BLOCK_M, BLOCK_N] tile of h [R, D] per program:
    h = act(((x - mu_b) / sigma_b) @ w1 + b1) with x [R, C], w1 [C, D] in the compute dtype. The norm is this
    GEMM's prologue: each A tile is normalised as it is loaded (float32, then rounded to the compute dtype, as
    mlp_norm_kernel rounds it), mu_b and sigma_b from the partials of x; bias and activation are its epilogue.
    The programs of one row tile are consecutive, so its A rows are read from memory once and then from L2."""
    n_tiles = tl.cdiv(D, BLOCK_N)
    tile_m = tl.program_id(0) // n_tiles
    tile_n = tl.program_id(0) % n_tiles
    row0 = tile_m * BLOCK_M
    first_sample = row0 // HW
    samples = first_sample + tl.arange(0, SEGS)
    mean, inv_sigma = _sample_moments(in_part_ptr, samples, samples * HW < R, HW, IN_SLOT_ROWS, eps, IN_SEGS,
                                      IN_MAX_SLOTS)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    seg = rows // HW - first_sample
    row_mean = _per_row(mean, seg, SEGS)[:, None]
    row_inv_sigma = _per_row(inv_sigma, seg, SEGS)[:, None]
    row_offsets = rows.to(tl.int64) * C
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    dot_dtype = w1_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C
        valid = row_ok[:, None] & k_ok[None, :]
        a = tl.load(x_ptr + row_offsets[:, None] + k[None, :], mask=valid, other=0.0).to(tl.float32)
        a = tl.where(valid, (a - row_mean) * row_inv_sigma, 0.0).to(dot_dtype)
        b = tl.load(w1_ptr + k[:, None] * D + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, DOT_UPCAST)
    if HAS_B1:
        acc += tl.load(b1_ptr + cols, mask=col_ok, other=0.0)[None, :]
    h = _activation(acc, ACT).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], h, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def fc2_kernel(h_ptr, w2_ptr, x_ptr, skip_ptr, b2_ptr, y_ptr, out_part_ptr, R, HW, C, D,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SKIP: tl.constexpr,
               HAS_B2: tl.constexpr, EMIT_STATS: tl.constexpr, SEGS: tl.constexpr, PRECISION: tl.constexpr,
               DOT_UPCAST: tl.constexpr):
    """fc2 of the GEMM form of the MLP, one [BLOCK_M, BLOCK_N] tile of y [R, C] per program:
    y = skip * x + h @ w2 + b2 with h [R, D], w2 [D, C] (LayerScale folded in) in the compute dtype; the
    residual is this GEMM's epilogue, summed in float32 and rounded once (as the fused kernel does). With
    EMIT_STATS (one column tile covers all C) the epilogue also writes y's partials, a slot per row tile."""
    n_tiles = tl.cdiv(C, BLOCK_N)
    tile_m = tl.program_id(0) // n_tiles
    tile_n = tl.program_id(0) % n_tiles
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    h_rows = rows.to(tl.int64) * D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        a = tl.load(h_ptr + h_rows[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w2_ptr + k[:, None] * C + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, DOT_UPCAST)
    y, valid = _residual_out(x_ptr, y_ptr, skip_ptr, b2_ptr, acc, rows.to(tl.int64) * C, row_ok, C,
                             tile_n * BLOCK_N, BLOCK_N, HAS_SKIP, HAS_B2)
    if EMIT_STATS:
        seg = rows // HW - (tile_m * BLOCK_M) // HW
        count, mean, m2 = _segment_stats(y, valid, seg, SEGS)
        _store_stats(out_part_ptr, tile_m, count, mean, m2, SEGS)

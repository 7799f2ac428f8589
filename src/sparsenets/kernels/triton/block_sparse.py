"""Triton kernels for ``Y = X·Wᵀ`` with a block-sparse ``W`` (see :mod:`sparsenets.kernels.layout`).

One program computes a ``BLOCK_M × r`` tile of Y by walking its row-block's kept blocks; the
input gradient walks the transposed index the same way, and the weight gradient computes one
kept block per program, reducing over the batch. Block sides are powers of two (16 or more on
GPU, where ``tl.dot`` needs them); matrix edges are masked.
"""

import triton
import triton.language as tl


@triton.jit
def forward_kernel(x_ptr, values_ptr, row_ptr, col_idx, bias_ptr, y_ptr,
                   rows, n_out, n_in, stride_x, stride_y,
                   R: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, row_block = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r, offs_c = tl.arange(0, R), tl.arange(0, C)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    start, end = tl.load(row_ptr + row_block), tl.load(row_ptr + row_block + 1)
    for e in range(start, end):
        cols = tl.load(col_idx + e) * C + offs_c
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + cols[None, :],
                    mask=(offs_m[:, None] < rows) & (cols[None, :] < n_in), other=0.0)
        w = tl.load(values_ptr + e * R * C + offs_r[:, None] * C + offs_c[None, :])
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    outs = row_block * R + offs_r
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < n_out, other=0.0)[None, :].to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_y + outs[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < rows) & (outs[None, :] < n_out))


@triton.jit
def input_grad_kernel(gy_ptr, values_ptr, t_ptr, t_row, t_block, gx_ptr,
                      rows, n_out, n_in, stride_gy, stride_gx,
                      R: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, col_block = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r, offs_c = tl.arange(0, R), tl.arange(0, C)
    acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    start, end = tl.load(t_ptr + col_block), tl.load(t_ptr + col_block + 1)
    for e in range(start, end):
        outs = tl.load(t_row + e) * R + offs_r
        gy = tl.load(gy_ptr + offs_m[:, None] * stride_gy + outs[None, :],
                     mask=(offs_m[:, None] < rows) & (outs[None, :] < n_out), other=0.0)
        w = tl.load(values_ptr + tl.load(t_block + e) * R * C + offs_r[:, None] * C + offs_c[None, :])
        acc += tl.dot(gy, w, input_precision=PRECISION)
    cols = col_block * C + offs_c
    tl.store(gx_ptr + offs_m[:, None] * stride_gx + cols[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < rows) & (cols[None, :] < n_in))


@triton.jit
def values_grad_kernel(gy_ptr, x_ptr, row_idx, col_idx, grad_ptr,
                       rows, n_out, n_in, stride_gy, stride_x,
                       R: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    e = tl.program_id(0)
    outs = tl.load(row_idx + e) * R + tl.arange(0, R)
    cols = tl.load(col_idx + e) * C + tl.arange(0, C)
    acc = tl.zeros((R, C), dtype=tl.float32)
    for m0 in range(0, rows, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        gy = tl.load(gy_ptr + offs_m[:, None] * stride_gy + outs[None, :],
                     mask=(offs_m[:, None] < rows) & (outs[None, :] < n_out), other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + cols[None, :],
                    mask=(offs_m[:, None] < rows) & (cols[None, :] < n_in), other=0.0)
        acc += tl.dot(tl.trans(gy), x, input_precision=PRECISION)
    offs_r, offs_c = tl.arange(0, R), tl.arange(0, C)
    tl.store(grad_ptr + e * R * C + offs_r[:, None] * C + offs_c[None, :], acc.to(grad_ptr.dtype.element_ty))

"""GPTQ (Frantar et al., 2022) for one linear layer, in the shape of the original repository: the
block loop feeds inputs with `add_batch`, `quantize` does the math.

    H = 2/n · Σ xᵀx over the layer's n input rows; dead columns (H_ii = 0) get H_ii = 1 and weight 0;
    H += percdamp · mean(diag H) · I;  U = chol(H⁻¹)ᵀ (upper)
    columns left to right (descending diag H with act_order), in lazy blocks: quantize a column onto
    its group's grid, spread its error (w − q)/U_ii over the later columns with row i of U.

The grid of each group comes from the layer's WeightQuantizer, with its clipping (LWC's learned
factors and the clipping search's ratios). By default the grids are static (GPTQ's --static-groups):
computed from the weights before any update, per natural group, so they are exactly the grids LWC
learned and the clipping search chose, and g_idx stays i // group_size (every kernel that reads
desc_act=False files reads ours, act_order included). static_groups=False gives GPTQ's original
dynamic grids, computed when GPTQ reaches a group's first column from the weights as updated so far;
the error spread into later columns then widens their ranges (SmolLM2-135M W3 g128: 185 against
RTN's 167 and static groups' 122 on 12 WikiText-2 windows), and act_order needs static groups.
Scales are rounded to fp16 before rounding onto them: the stored scale is the one GPTQ optimised for.
"""
from __future__ import annotations

import math

import torch

from ..quant.quantizer import grid_codes


class Hessian:
    """Running H = 2/n · Σ xᵀx of a linear's inputs (GPTQ's add_batch)."""

    def __init__(self, columns: int, device=None):
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x.T @ x


class GPTQ:
    def __init__(self, hessian: Hessian, percdamp: float = 0.01, act_order: bool = False, blocksize: int = 128,
                 static_groups: bool = True):
        self.hessian, self.percdamp, self.act_order, self.blocksize = hessian, percdamp, act_order, blocksize
        self.static_groups = static_groups or act_order

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, quantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round `weight` (out, in) onto `quantizer`'s grid (a WeightQuantizer). Returns codes (out, in)
        int32 and scale, zero (out, n_groups): dequantize(codes, scale, zero) is the GPTQ weight."""
        W = weight.detach().float().clone()
        H = self.hessian.H.clone()
        rows, columns = W.shape
        gs = quantizer.group_size or columns
        n_groups = quantizer.n_groups
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        scale = torch.zeros(rows, n_groups, device=W.device)
        zero = torch.zeros(rows, n_groups, device=W.device)
        # a K-quant's scales share a step per super-block, so they are set together, before any update
        static_groups = self.static_groups or bool(quantizer.super_groups)
        if static_groups:
            s, z = quantizer.scale_zero(W)                        # from the weights before any update
            scale, zero = quantizer.stored_scale(s[..., 0]), z[..., 0]
        if self.act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
        else:
            perm = torch.arange(columns, device=W.device)
        H[range(columns), range(columns)] += self.percdamp * torch.mean(torch.diag(H))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        # Lazy blocks aligned to groups, so a group's grid is always computed from its current weights.
        blocksize = gs * max(1, self.blocksize // gs) if gs < columns else self.blocksize
        codes = torch.zeros(rows, columns, dtype=torch.int32, device=W.device)
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                g = int(perm[col]) // gs
                if not static_groups and col % gs == 0:
                    if gs < columns:
                        cols = W1[:, i:i + gs]                   # a whole group lies inside the block
                    else:
                        cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)   # per channel: at column 0, no update yet
                    s, z = quantizer.group_scale_zero(cols, g)
                    scale[:, g], zero[:, g] = quantizer.stored_scale(s), z
                w = W1[:, i]
                q = grid_codes(w, scale[:, g], zero[:, g], quantizer.qmax)
                codes[:, col] = q.to(torch.int32)
                dq = (q - zero[:, g]) * scale[:, g]
                err = (w - dq) / Hinv1[i, i]
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if self.act_order:
            codes = codes[:, torch.argsort(perm)]
        return codes, scale, zero

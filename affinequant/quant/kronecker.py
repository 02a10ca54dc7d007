"""FlatQuant's transform math: Kronecker-factored invertible matrices and their parametrisations.

A transform P = P1 ⊗ P2 of an n-dimensional activation (n = n1·n2) is applied without forming P:
reshape x to (n1, n2) and compute P1ᵀ·X·P2 (row-vector convention: x ↦ x·P), O(n·(n1 + n2)).
A consumer's weight becomes W·P⁻ᵀ (each row w ↦ w·P⁻ᵀ), so x·P·(W·P⁻ᵀ)ᵀ = x·Wᵀ before quantization.

Each factor is learned either through its SVD, U·diag(σ)·Vᵀ with U and V orthogonal (so P⁻ᵀ = U·diag(1/σ)·Vᵀ
exactly, no inversion), or directly as a free matrix inverted in float64 (FlatQuant's --direct_inv).
Both start from a random orthogonal matrix (QR of a Gaussian), as FlatQuant does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

PARAMETRIZATIONS = ("svd", "direct")


def decompose_dim(n: int) -> tuple[int, int]:
    """(n1, n2) with n1·n2 = n, n1 <= n2 and n1 as close to √n as possible (FlatQuant's factor sizes; its
    a² − b² search finds the same pair wherever both exist, and this one exists for every n)."""
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n1, n // n1


def kron_matmul(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """x·(left ⊗ right) over the last dimension of x; `right` None is the identity of the size that fits
    (a transform that mixes heads only: x as (heads, head_dim), leftᵀ·X)."""
    n1 = left.shape[0]
    shape = x.shape
    grid = x.reshape(*shape[:-1], n1, shape[-1] // n1)
    out = left.to(x.dtype).transpose(0, 1) @ grid
    if right is not None:
        out = out @ right.to(x.dtype)
    return out.reshape(shape)


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()      # sign fix: Haar-distributed


def cayley(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix (I + S)(I − S)⁻¹ of the skew-symmetric S = A − Aᵀ (the identity at A = 0)."""
    s = a - a.transpose(0, 1)
    eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
    return torch.linalg.solve(eye - s, eye + s, left=False)


class SVDFactor(nn.Module):
    """P = U·diag(σ)·Vᵀ, U = U₀·cayley(A) and V = V₀·cayley(B) orthogonal at every step, σ learned directly
    (start 1): P⁻ᵀ = U·diag(1/σ)·Vᵀ is exact and cheap."""

    def __init__(self, n: int, generator: torch.Generator | None = None, device=None):
        super().__init__()
        self.register_buffer("u0", random_orthogonal(n, generator).to(device))
        self.register_buffer("v0", random_orthogonal(n, generator).to(device))
        self.u_skew = nn.Parameter(torch.zeros(n, n, device=device))
        self.v_skew = nn.Parameter(torch.zeros(n, n, device=device))
        self.sigma = nn.Parameter(torch.ones(n, device=device))

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        for t in (self.u0, self.v0):
            t.copy_(torch.eye(t.shape[0], device=t.device))
        self.u_skew.zero_()
        self.v_skew.zero_()
        self.sigma.fill_(1.0)

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, P⁻ᵀ), differentiable."""
        u = self.u0 @ cayley(self.u_skew)
        v = self.v0 @ cayley(self.v_skew)
        return (u * self.sigma) @ v.transpose(0, 1), (u / self.sigma) @ v.transpose(0, 1)


class DirectFactor(nn.Module):
    """P a free matrix (start: random orthogonal); P⁻ᵀ by inversion in float64 at every step."""

    def __init__(self, n: int, generator: torch.Generator | None = None, device=None):
        super().__init__()
        self.matrix = nn.Parameter(random_orthogonal(n, generator).to(device))

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        self.matrix.copy_(torch.eye(self.matrix.shape[0], device=self.matrix.device))

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.matrix, torch.linalg.inv(self.matrix.double()).transpose(0, 1).to(self.matrix.dtype)


def make_factor(n: int, parametrization: str, generator=None, device=None) -> nn.Module:
    return (SVDFactor if parametrization == "svd" else DirectFactor)(n, generator, device)

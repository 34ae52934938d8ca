"""Cayley SGD: gradient descent that keeps square matrices orthogonal (the Stiefel manifold O(n)).

For an orthogonal R with Euclidean gradient G (accumulated with momentum into M), the skew-symmetric
A = M R^T - R M^T generates the descent curve R(t) = (I + t/2 A)^-1 (I - t/2 A) R, the Cayley
transform (Wen & Yin 2013; Li, Li & Todorovic 2020, as used by SpinQuant). A Cayley transform of a
skew matrix is orthogonal, so every iterate stays on the manifold to the precision of one linear solve;
to first order the step is R - t (G - R G^T R), the Riemannian gradient under the canonical metric.
The step is t = min(lr, 1 / |A|_F) (Li et al.'s adaptive step), so no update rotates far whatever the
gradient's scale.
Parameters are updated in float64 whatever precision the loss was computed in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def orthogonality_error(r: torch.Tensor) -> float:
    """max |R^T R - I|: how far R is from orthogonal."""
    r64 = r.detach().to(torch.float64)
    return float((r64.T @ r64 - torch.eye(r.shape[0], dtype=torch.float64)).abs().max())


class CayleySGD(torch.optim.Optimizer):
    """SGD with momentum on orthogonal matrices through the Cayley transform (see the module doc).

    Every parameter must be a square float64 orthogonal matrix; `step` keeps it orthogonal.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.5, momentum: float = 0.0) -> None:
        if lr <= 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"need lr > 0 and momentum in [0, 1), got lr {lr}, momentum {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.shape[0] != p.shape[1] or p.dtype != torch.float64:
                    raise ValueError(f"CayleySGD needs square float64 matrices, got {tuple(p.shape)} {p.dtype}")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to(torch.float64)
                state = self.state[p]
                if momentum:
                    buf = state.get("momentum")
                    buf = g.clone() if buf is None else buf.mul_(momentum).add_(g)
                    state["momentum"] = buf
                    g = buf
                a = g @ p.T - p @ g.T
                # the adaptive step of Li et al. (2020): t |A| <= 1 keeps each update a moderate rotation
                t = min(lr, 1.0 / (float(torch.linalg.matrix_norm(a)) + 1e-8))
                eye = torch.eye(p.shape[0], dtype=torch.float64)
                p.copy_(torch.linalg.solve(eye + (t / 2) * a, (eye - (t / 2) * a) @ p))

"""LRF's linear algebra: leave-one-out ridge fits from one inverse Gram, greedy removal with
rank-one (Schur complement) updates, the joint fit of the removed channels by the kept ones.

``G`` is a Gram matrix of the channels (BN-scaled filters, or the covariance of what a consumer
reads) plus a ridge relative to its mean diagonal; ``P = G^-1``. See :mod:`autoprune.methods.lrf`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _ridge_cholesky_inverse(filters: Tensor, eps: float) -> Tensor:
    """``L^-1`` for ``L L^T = G = U U^T + eps * mean(diag(U U^T)) I`` (float64), rows ``U``."""
    u = filters.double()
    gram = u @ u.T
    scale = float(gram.diagonal().mean()) if gram.numel() else 1.0
    gram.diagonal().add_(eps * (scale if scale > 0 else 1.0))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve_triangular(torch.linalg.cholesky(gram), eye, upper=False)


def ridge_inverse(filters: Tensor, eps: float) -> Tensor:
    """``P = G^-1`` with ``G = U U^T + eps * mean(diag(U U^T)) I`` (float64) for filter rows ``U``."""
    inv_l = _ridge_cholesky_inverse(filters, eps)
    return inv_l.T @ inv_l


def loo_residuals(filters: Tensor, eps: float) -> Tensor:
    """``1 / diag(G^-1)``: every filter's leave-one-out ridge residual, without forming ``G^-1``."""
    return 1.0 / _ridge_cholesky_inverse(filters, eps).pow(2).sum(0)


def loo_fit(p: Tensor) -> tuple[Tensor, Tensor]:
    """Leave-one-out ridge fits from ``P = G^-1``: residuals ``1/P_kk`` (n,) and coefficients
    ``coef[j, k] = -P_jk / P_kk`` of filter j in the fit of filter k (``coef[k, k] = 0``).

    The ridge residual is ``min_lambda ||u_k - sum_j lambda_j u_j||^2 + eps (||lambda||^2 + 1)``:
    the plain residual of the fit of the filters augmented by ``sqrt(eps) e_k``.
    """
    d = p.diagonal()
    coef = -p / d
    coef.fill_diagonal_(0)
    return 1.0 / d, coef


def greedy_order(p: Tensor, h: Tensor, n_remove: int, step: int = 1, compensate: bool = True,
                 block: int = 128) -> list[int]:
    """Channels in removal order: each step picks the ``step`` lowest ``h_kk / p_kk`` (squared
    scores) and removes them one by one, updating ``p`` (inverse ridge Gram of the filters) by a
    Schur complement and, when compensating, ``h`` (consumer Gram) for ``v_j += lambda_j v_k``.

    Removing k: ``P' = P - P_:k P_k: / P_kk``; with ``lambda = -P_:k / P_kk`` (``lambda_k = -1``),
    ``V' = V + lambda v_k`` so ``H' = H + lambda g^T + g lambda^T``, ``g = H_:k + H_kk lambda / 2``.
    A removal needs only the diagonals and column k, so the rank-one terms are kept as factors
    (matrix-vector products per removal) and folded into ``p`` and ``h`` by one matrix product
    every ``block`` removals, when both also shrink to the live channels. O(n^2) per removal.
    """
    p = p.double().clone()
    h = h.double().clone() if compensate else h
    dev, n = p.device, p.shape[0]
    ids = torch.arange(n, device=dev)  # original channel of each current row
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    dp = p.diagonal().clone()
    dh = h.diagonal().double().clone()  # current ||v_k||^2 (fixed without compensation)
    fu, fl, fg = (torch.empty(block, n, dtype=torch.float64, device=dev) for _ in range(3))  # factor rows
    t = 0
    removed: list[int] = []
    while len(removed) < n_remove:
        score = (dh / dp).masked_fill(~alive, math.inf)
        chosen = torch.topk(score, min(step, n_remove - len(removed)), largest=False).indices
        for cid in ids[chosen].tolist():  # one at a time: equal to removing the set at once
            k = int(torch.searchsorted(ids, cid))  # its current row (ids stay sorted)
            if t == block:  # fold the factors in and drop removed rows
                keep = alive.nonzero().squeeze(1)
                p = torch.addmm(p, fu.T, fu, alpha=-1.0)[keep][:, keep]
                dp, ids, alive = p.diagonal().clone(), ids[keep], alive[keep]
                if compensate:
                    h = torch.addmm(torch.addmm(h, fl.T, fg), fg.T, fl)[keep][:, keep]
                    dh = h.diagonal().clone()
                else:
                    dh = dh[keep]
                fu, fl, fg = (f[:, keep] for f in (fu, fl, fg))
                k, t = int(torch.searchsorted(ids, cid)), 0
            col = p[:, k] - torch.mv(fu[:t].T, fu[:t, k])  # current P[:, k]
            pkk = col[k].clamp_min(1e-300)  # > 0 in exact arithmetic (G is SPD)
            fu[t] = col / pkk.sqrt()
            dp -= fu[t] * fu[t]
            if compensate:
                lam = -col / pkk
                hk = h[:, k] + torch.mv(fl[:t].T, fg[:t, k]) + torch.mv(fg[:t].T, fl[:t, k])  # current H_:k
                fl[t], fg[t] = lam, hk + 0.5 * hk[k] * lam
                dh += 2 * fl[t] * fg[t]
            t += 1
            alive[k] = False
            removed.append(int(ids[k]))
    return removed


def joint_fit(p: Tensor, keep: Tensor, removed: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Ridge fit of the removed filters by the kept ones, from ``P = G^-1``: ``coef`` (|keep| x
    |removed|) with ``u_r ~ sum_j coef[j, r] u_j``, i.e. ``G_KK^-1 G_KR = -P_KR P_RR^-1``, and the
    constants ``delta_r = c_r - sum_j coef[j, r] c_j``. Equal to chaining the greedy's one-at-a-time
    fits (least squares composes), so consumers are compensated once per group."""
    coef = -torch.linalg.solve(p[removed][:, removed], p[removed][:, keep]).T
    return coef, offsets[removed] - coef.T @ offsets[keep]


def ridge_inverse_gram(gram: Tensor, eps: float) -> Tensor:
    """``(G + eps * mean(diag G) I)^-1`` (float64) for a symmetric PSD ``G``."""
    g = gram.double().clone()
    scale = float(g.diagonal().mean()) if g.numel() else 1.0
    g.diagonal().add_(eps * (scale if scale > 0 else 1.0))
    return torch.cholesky_inverse(torch.linalg.cholesky(g))


def greedy_order_multi(ps: Sequence[Tensor], hs: Sequence[Tensor], n_remove: int, step: int = 1,
                       compensate: bool = True) -> list[int]:
    """Removal order shared by several consumers: each step removes the ``step`` channels with the
    lowest summed squared score ``sum_c H_c,kk / P_c,kk``, one at a time, updating every ``P_c``
    by the Schur complement and, when compensating, every ``H_c`` for ``v_j += lambda_j v_k``
    (see :func:`autoprune.methods.lrf.greedy_order`, the single-consumer, blocked version).
    O(consumers * n^2) per removal."""
    ps = [p.double().clone() for p in ps]
    hs = [h.double().clone() for h in hs]
    n = ps[0].shape[0]
    alive = torch.ones(n, dtype=torch.bool, device=ps[0].device)
    removed: list[int] = []
    while len(removed) < n_remove:
        score = sum(h.diagonal() / p.diagonal().clamp_min(1e-300) for p, h in zip(ps, hs, strict=True))
        score = score.masked_fill(~alive, math.inf)
        chosen = torch.topk(score, min(step, n_remove - len(removed)), largest=False).indices.tolist()
        for k in chosen:
            for i, p in enumerate(ps):
                col = p[:, k].clone()
                pkk = col[k].clamp_min(1e-300)
                p.sub_(torch.outer(col, col) / pkk)
                if compensate:
                    h = hs[i]
                    lam = -col / pkk
                    lam[k] = -1.0
                    g = h[:, k] + 0.5 * h[k, k] * lam
                    h.add_(torch.outer(lam, g) + torch.outer(g, lam))
            alive[k] = False
            removed.append(int(k))
    return removed

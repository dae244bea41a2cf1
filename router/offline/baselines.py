"""Baseline routers, trained on the same split and embeddings as caprouter's own.

Each returns predicted quality Qhat (n_test, B); costs are predicted the same way for all (the
caller's Chat), so routers differ only in what they know about quality.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt


def random_router(n: int, B: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).random((n, B)).astype(np.float32)


def knn_router(Xtr: npt.NDArray[np.float32], Ytr: npt.NDArray[np.float32], Xte: npt.NDArray[np.float32],
               k: int = 40) -> npt.NDArray[np.float32]:
    """RouterBench's kNN router: the plain mean score of the k nearest training prompts (cosine)."""
    import faiss

    index = faiss.IndexFlatIP(Xtr.shape[1])
    index.add(np.ascontiguousarray(Xtr, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(Xte, dtype=np.float32), k)
    nb = Ytr[idx]                                               # (n, k, B)
    col = np.nanmean(Ytr, 0)
    with np.errstate(invalid="ignore"):
        q = np.nanmean(nb, 1)
    return np.asarray(np.where(np.isnan(q), col, q), dtype=np.float32)


def _fit_torch(model, X, Y, Xv, Yv, *, lr=2e-3, wd=1e-4, epochs=300, patience=20, bs=256, seed=0):
    import copy

    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    m, mv = ~np.isnan(Y), ~np.isnan(Yv)
    Xt, Yt, Mt = torch.as_tensor(X), torch.as_tensor(np.where(m, Y, 0).astype(np.float32)), torch.as_tensor(m.astype(np.float32))
    Xvt, Yvt, Mvt = torch.as_tensor(Xv), torch.as_tensor(np.where(mv, Yv, 0).astype(np.float32)), torch.as_tensor(mv.astype(np.float32))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    best, best_state, bad = float("inf"), copy.deepcopy(model.state_dict()), 0
    for _ in range(epochs):
        model.train()
        perm = rng.permutation(len(X))
        for s in range(0, len(perm), bs):
            i = torch.as_tensor(perm[s:s + bs])
            loss = (bce(model(Xt[i]), Yt[i], reduction="none") * Mt[i]).sum() / Mt[i].sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            vl = float((bce(model(Xvt), Yvt, reduction="none") * Mvt).sum() / Mvt.sum())
        if vl < best - 1e-5:
            best, best_state, bad = vl, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model


def _predict(model, X) -> npt.NDArray[np.float32]:
    import torch

    with torch.no_grad():
        return torch.sigmoid(model(torch.as_tensor(X))).numpy()


def mlp_router(Xtr, Ytr, Xv, Yv, Xte, *, hidden: int = 256, seed: int = 0) -> npt.NDArray[np.float32]:
    """A per-backend MLP classifier: one hidden layer, one sigmoid output per backend."""
    from torch import nn

    model = nn.Sequential(nn.Linear(Xtr.shape[1], hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, Ytr.shape[1]))
    return _predict(_fit_torch(model, Xtr, Ytr, Xv, Yv, seed=seed), Xte)


def mf_router(Xtr, Ytr, Xv, Yv, Xte, *, dim: int = 64, seed: int = 0) -> npt.NDArray[np.float32]:
    """RouteLLM's matrix factorization, for B backends: logit = <W x, v_b> + c_b, i.e. a bilinear
    model between a linear projection of the prompt embedding and a learned vector per model."""
    import torch
    from torch import nn

    class MF(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Linear(Xtr.shape[1], dim, bias=False)
            self.v = nn.Parameter(torch.randn(Ytr.shape[1], dim) * 0.05)
            self.c = nn.Parameter(torch.zeros(Ytr.shape[1]))

        def forward(self, x):
            return self.W(x) @ self.v.T + self.c

    return _predict(_fit_torch(MF(), Xtr, Ytr, Xv, Yv, seed=seed), Xte)

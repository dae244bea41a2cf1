"""The capability encoder: prompt embedding -> capability vector, one vector per backend.

    z = f(x)                                  f: MLP, 384 -> hidden -> d
    a_k = <z/|z|, mu_k/|mu_k|> / tau_p        soft assignment to K capability codes (prototypes)
    logit_b = <z, g_b> + beta_b + sum_k softmax(a)_k H_kb
    p(b answers x well) = sigmoid(logit_b)

Training objective (docs/capability_encoder.md has the equations and the ablation):
    L = L_pred + w_con L_con + w_ot L_ot
  L_pred: binary cross-entropy on the observed scores (missing scores masked out);
  L_con:  soft contrastive: the distribution softmax(<z_i, z_j>/tau) over a batch is pulled towards
          the one given by the similarity of the prompts' outcome profiles (RouterDC, APTP);
  L_ot:   the batch's soft assignment to the K codes is pulled towards the Sinkhorn transport plan
          between the prompts (uniform mass) and the codes (mass = each code's target traffic
          share), computed with POT; the marginal keeps the codes from collapsing into one.

A backend's vector g_b can be fitted from its aptitude results alone with f frozen
(``onboard``): Model-SAT's onboarding without retraining the prompt side.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


def _default_scales() -> list[list[float]]:
    return [[0, 0], [128, 1.0]]


@dataclass
class CapabilityConfig:
    dim: int = 64
    hidden: int = 256         # 0: the prompt map is linear (with codes=1 and no kNN: RouteLLM's MF)
    codes: int = 8
    dropout: float = 0.1
    w_con: float = 0.2
    w_ot: float = 0.1
    tau: float = 0.1          # contrastive temperature over embeddings
    tau_y: float = 0.5        # temperature over outcome-profile distances
    tau_p: float = 0.1        # assignment temperature
    sinkhorn_reg: float = 0.05
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 300
    patience: int = 20
    seed: int = 0
    code_marginal: list[float] | None = None   # None: uniform
    knn_init: float = 0.5     # initial weight of the kNN estimate's logit
    w_rank: float = 0.0       # weight of the pairwise ranking term between backends on a prompt
    # The datastore neighbourhoods whose estimates are inputs, as [k, temperature] (0: the
    # datastore's own setting). None: the datastore's neighbourhood only. Default: its own (sharp:
    # the closest few dominate) and a broad one (128 neighbours, nearly a plain average).
    knn_scales: list[list[float]] | None = field(default_factory=lambda: _default_scales())
    # False: the datastore's estimates are not an input (their weights stay 0): a plain learned
    # router, which `caprouter train` weighs against the blend (router/offline/candidates.py).
    knn_blend: bool = True

    @property
    def n_scales(self) -> int:
        return len(self.knn_scales) if self.knn_scales else 1


def build_model(in_dim: int, n_backends: int, cfg: CapabilityConfig):
    import torch
    from torch import nn

    class CapabilityModel(nn.Module):
        knn_scales: list[list[float]] | None     # how to compute the knn input it expects
        tau_p: float

        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                   nn.Linear(cfg.hidden, cfg.dim)) if cfg.hidden else nn.Sequential(nn.Linear(in_dim, cfg.dim))
            self.g = nn.Parameter(torch.randn(n_backends, cfg.dim) * 0.05)
            self.beta = nn.Parameter(torch.zeros(n_backends))
            self.mu = nn.Parameter(torch.randn(cfg.codes, cfg.dim))
            self.H = nn.Parameter(torch.zeros(cfg.codes, n_backends))
            # Per-backend, per-neighbourhood weight of the datastore's kNN estimates (as logits):
            # the learned blend.
            self.w = nn.Parameter(torch.full((n_backends, cfg.n_scales), cfg.knn_init / cfg.n_scales)
                                  if cfg.knn_blend else torch.zeros((n_backends, cfg.n_scales)),
                                  requires_grad=cfg.knn_blend)

        def embed(self, x):
            return self.f(x)

        def assign_logits(self, z):
            return nn.functional.normalize(z, dim=-1) @ nn.functional.normalize(self.mu, dim=-1).T / cfg.tau_p

        def forward(self, x, knn=None):
            """x: (n, in_dim); knn: (n, B) or (n, B, S) kNN quality estimates (S neighbourhoods)
            or None -> logits (n, B), z (n, d), assignment logits (n, K)."""
            z = self.f(x)
            a = self.assign_logits(z)
            logits = z @ self.g.T + self.beta + torch.softmax(a, -1) @ self.H
            if knn is not None:
                kl = knn_logit(knn)
                logits = logits + (self.w * (kl if kl.ndim == 3 else kl[..., None])).sum(-1)
            return logits, z, a

    model = CapabilityModel()
    model.knn_scales = cfg.knn_scales      # how to compute the knn input it expects
    model.tau_p = cfg.tau_p
    return model


def knn_logit(q):
    """logit of kNN quality estimates, clipped away from 0 and 1 (a tensor in, a tensor out)."""
    import torch

    q = torch.as_tensor(q, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
    return torch.log(q / (1 - q))


def _masked_bce(logits, y, m):
    import torch

    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (loss * m).sum() / m.sum().clamp(min=1)


def ranking_loss(logits, y, m):
    """Pairwise term: where backend j scored higher than k on a prompt, logit_j should exceed
    logit_k (weighted by the score gap). Routing ranks backends per prompt; the prediction loss
    alone fits each backend's level, not the order between them. logits, y, m: (n, B)."""
    import torch

    d = logits[:, :, None] - logits[:, None, :]
    gap = (y[:, :, None] - y[:, None, :]).clamp(min=0) * (m[:, :, None] * m[:, None, :])
    return (gap * torch.nn.functional.softplus(-d)).sum() / gap.sum().clamp(min=1e-6)


def contrastive_loss(z, y_filled, tau: float, tau_y: float):
    """Soft contrastive term. z: (n, d); y_filled: (n, B) outcome profiles (missing -> column mean)."""
    import torch

    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    zn = torch.nn.functional.normalize(z, dim=-1)
    logits = (zn @ zn.T / tau).masked_fill(eye, -1e9)
    d2 = torch.cdist(y_filled, y_filled).pow(2) / y_filled.shape[1]
    target = torch.softmax((-d2 / tau_y).masked_fill(eye, -1e9), dim=-1)
    return -(target * torch.log_softmax(logits, -1)).sum(-1).mean()


def sinkhorn_plan(a, marginal: npt.NDArray[np.float64], reg: float) -> npt.NDArray[np.float64]:
    """The entropic OT plan between n prompts (uniform) and K codes (``marginal``), cost -a.

    a: (n, K) assignment logits (as numpy). Returns the plan scaled so each row sums to 1."""
    n = a.shape[0]
    M = -a.astype(np.float64)
    M = M - M.min()
    M = M / max(M.max(), 1e-12)
    if reg >= 1.0 / 600:
        return _sinkhorn_knopp(M, marginal, reg) * n
    # Smaller regularizations underflow that kernel: POT's log-domain iterations. On torch tensors
    # POT runs its torch backend: the same plan (to 1e-17) 6x faster than on numpy arrays, whose
    # logsumexp (scipy's, per iteration) took 90% of a training run's time.
    import ot
    import torch

    plan = ot.sinkhorn(torch.full((n,), 1.0 / n, dtype=torch.float64), torch.as_tensor(marginal, dtype=torch.float64),
                       torch.as_tensor(M), reg, method="sinkhorn_log", numItermax=500, stopThr=1e-6,
                       warn=False)   # a plan short of 1e-6 after 500 iterations is still a fine soft target
    return plan.numpy() * n


def _sinkhorn_knopp(M: npt.NDArray[np.float64], b: npt.NDArray[np.float64], reg: float, *, iters: int = 500,
                    tol: float = 1e-6) -> npt.NDArray[np.float64]:
    """Entropic OT plan between uniform rows and column marginal ``b`` for cost M (n, K) in [0, 1]:
    POT's ``sinkhorn_knopp`` (same iterations, same stopping test every 10th), without its
    per-iteration checks for zeros and NaN, which cannot arise here: the kernel exp(-M / reg)
    stays above e^-600 (float64 holds it) for the regularizations this is called with.

    Why not POT: measured on 316 logit batches of real training runs (256 x 8), POT's plain
    Sinkhorn on numpy took 5.6 ms per plan, most of it in those checks, and its log-domain
    iterations on torch (used before) about 10 ms; this takes 1.3 ms for the identical plan
    (tested against both). The OT term's plans had been 36% of `caprouter train`'s choosing time."""
    n = M.shape[0]
    K = np.exp(-M / reg)
    a = np.full(n, 1.0 / n)
    u, v = np.full(n, 1.0 / n), np.full(len(b), 1.0 / len(b))
    Kp = K / a[:, None]
    for it in range(iters):
        v = b / (K.T @ u)
        u = 1.0 / (Kp @ v)
        if it % 10 == 0 and np.linalg.norm(v * (K.T @ u) - b) < tol:
            break
    return u[:, None] * K * v[None, :]


def ot_loss(a, marginal: npt.NDArray[np.float64], reg: float):
    import torch

    plan = sinkhorn_plan(a.detach().cpu().numpy(), marginal, reg)
    target = torch.as_tensor(plan, dtype=a.dtype, device=a.device)
    return -(target * torch.log_softmax(a, -1)).sum(-1).mean()


@dataclass
class TrainResult:
    model: Any
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = math.inf


def train(X: npt.NDArray[np.float32], Y: npt.NDArray[np.float32], Xv: npt.NDArray[np.float32],
          Yv: npt.NDArray[np.float32], cfg: CapabilityConfig, *, K: npt.NDArray[np.float32] | None = None,
          Kv: npt.NDArray[np.float32] | None = None, progress: bool = False) -> TrainResult:
    """X: (n, d_in) unit embeddings; Y: (n, B) scores in [0, 1], NaN = not observed. Early stopping
    on the validation prediction loss (Xv, Yv); returns the best epoch's model.

    K, Kv: (n, B) the datastore's kNN estimates for the same prompts, out of sample (for training
    prompts: from a store that does not hold them), or None to train without the datastore."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    B = Y.shape[1]
    model = build_model(X.shape[1], B, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    marginal = np.asarray(cfg.code_marginal or [1.0 / cfg.codes] * cfg.codes, dtype=np.float64)
    marginal = marginal / marginal.sum()
    col_mean = np.nanmean(Y, 0)

    def tensors(Xa, Ya):
        m = ~np.isnan(Ya)
        yf = np.where(m, Ya, col_mean)
        return (torch.as_tensor(Xa), torch.as_tensor(np.where(m, Ya, 0.0).astype(np.float32)),
                torch.as_tensor(m.astype(np.float32)), torch.as_tensor(yf.astype(np.float32)))

    Xt, Yt, Mt, Ft = tensors(X, Y)
    Xvt, Yvt, Mvt, _ = tensors(Xv, Yv)
    Kt = None if K is None else torch.as_tensor(K, dtype=torch.float32)
    Kvt = None if Kv is None else torch.as_tensor(Kv, dtype=torch.float32)
    res = TrainResult(model)
    best_state = copy.deepcopy(model.state_dict())
    bad = 0
    bar = tqdm(range(cfg.max_epochs), desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = rng.permutation(len(X))
        tot = {"pred": 0.0, "con": 0.0, "ot": 0.0}
        for s in range(0, len(perm), cfg.batch_size):
            idx = torch.as_tensor(perm[s:s + cfg.batch_size])
            if len(idx) < 8:
                continue
            logits, z, a = model(Xt[idx], None if Kt is None else Kt[idx])
            l_pred = _masked_bce(logits, Yt[idx], Mt[idx])
            loss = l_pred
            tot["pred"] += l_pred.item() * len(idx)
            if cfg.w_rank > 0:
                loss = loss + cfg.w_rank * ranking_loss(logits, Yt[idx], Mt[idx])
            if cfg.w_con > 0:
                l_con = contrastive_loss(z, Ft[idx], cfg.tau, cfg.tau_y)
                loss = loss + cfg.w_con * l_con
                tot["con"] += l_con.item() * len(idx)
            if cfg.w_ot > 0:
                l_ot = ot_loss(a, marginal, cfg.sinkhorn_reg)
                loss = loss + cfg.w_ot * l_ot
                tot["ot"] += l_ot.item() * len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            vl = float(_masked_bce(model(Xvt, Kvt)[0], Yvt, Mvt))
        res.history.append({"epoch": epoch, "val_bce": vl, **{k: v / len(X) for k, v in tot.items()}})
        bar.set_postfix(val_bce=f"{vl:.4f}")
        if vl < res.best_val - 1e-5:
            res.best_val, res.best_epoch, bad = vl, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return res


def predict(model, X: npt.NDArray[np.float32], K: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
    """(n, d_in) embeddings and (n, B) kNN estimates (None: without the datastore) -> (n, B) quality."""
    import torch

    with torch.no_grad():
        return torch.sigmoid(model(torch.as_tensor(X, dtype=torch.float32), K)[0]).numpy()


class FrozenCapability:
    """The eval-mode forward of a trained capability model in numpy, for serving one prompt at a
    time: on a 2-core CPU a torch call costs ~0.2 ms of dispatch (and a hop to the compute
    thread ~0.4 ms more) for ~10 us of arithmetic, which would double what routing adds to the
    embedding. Built from the model's weights; ``predict`` matches ``predict(model, ...)``."""

    def __init__(self, model) -> None:
        def a(t):
            return t.detach().cpu().numpy().astype(np.float64)

        lin1, lin2 = model.f[0], model.f[-1]
        self.W1, self.b1 = a(lin1.weight).T, a(lin1.bias)
        self.W2, self.b2 = a(lin2.weight).T, a(lin2.bias)
        self.linear = len(model.f) == 1
        mu = a(model.mu)
        self.mu_n = mu / np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)
        self.g, self.beta, self.H, self.w = a(model.g), a(model.beta), a(model.H), a(model.w)
        self.tau_p = float(model.tau_p)

    def predict(self, X: npt.NDArray[np.float32], K: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
        """X: (n, d_in); K: (n, B) or (n, B, S) kNN estimates, or None -> (n, B) quality."""
        from scipy.special import erf

        h = X.astype(np.float64) @ self.W1 + self.b1
        if self.linear:
            z = h
        else:
            h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))                 # exact GELU, as nn.GELU()
            z = h @ self.W2 + self.b2
        zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        a = zn @ self.mu_n.T / self.tau_p
        sm = np.exp(a - a.max(1, keepdims=True))
        sm /= sm.sum(1, keepdims=True)
        logits = z @ self.g.T + self.beta + sm @ self.H
        if K is not None:
            q = np.clip(np.asarray(K, dtype=np.float64), 1e-3, 1 - 1e-3)
            kl = np.log(q / (1 - q))
            logits = logits + (self.w * (kl if kl.ndim == 3 else kl[..., None])).sum(-1)
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def code_assignment(model, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """(n, d_in) -> (n, K) soft assignment of prompts to capability codes."""
    import torch

    with torch.no_grad():
        _, _, a = model(torch.as_tensor(X, dtype=torch.float32))
        return torch.softmax(a, -1).numpy()


def onboard(model, X: npt.NDArray[np.float32], y: npt.NDArray[np.float32], *, l2: float = 0.1,
            steps: int = 300, knn: npt.NDArray[np.float32] | None = None, prior: str = "span",
            fit_w: bool = True, peer_residuals: npt.NDArray[np.float32] | None = None
            ) -> tuple[npt.NDArray[np.float32], float, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Fit a new backend's (g, beta, H column) from its aptitude results, the prompt side frozen.

    X: (m, d_in) aptitude prompts; y: (m,) the backend's scores. knn: (m,) or (m, S) the
    datastore's out-of-sample estimates for the new backend on those prompts, or None. Returns
    (g (d,), beta, h (K,), w (S,)): w, the weights of its datastore estimates, starts at the
    trained backends' mean and, with fit_w, is fitted too (shrunk towards that mean): a backend
    known from a few dozen outcomes has sparser neighbours than the trained ones, and the
    out-of-fold estimates on its aptitude prompts show how far to trust them.

    prior "span" (Model-SAT's view: a model is described by where it sits among known models):
        (g, beta, h) = A^T a + (delta_g, c, delta_h),   A: the trained backends' (g, beta, h)
    with a (B,) free and the residual delta shrunk by l2: a few dozen results place the new
    backend among the known ones (B + 1 numbers), and only what they cannot express costs the
    l2 penalty. prior "mean": the parameters are shrunk towards the trained backends' mean.

    peer_residuals: (m, B) the trained backends' observed scores on the aptitude prompts minus
    the model's predictions for them (NaN: not observed), or None. A sample of a few dozen
    prompts is luckier or harder than the traffic by chance, and the trained backends show by how
    much: their residuals enter the fit as covariates (coefficients fitted, l2-shrunk) and are
    dropped afterwards (their expectation on new prompts is zero), so the new backend's level is
    not biased by the sample's luck (a control variate).
    """
    import torch

    if prior not in ("span", "mean"):
        raise ValueError(f"prior must be 'span' or 'mean', got {prior!r}")
    with torch.no_grad():
        _, z, a = model(torch.as_tensor(X, dtype=torch.float32))
        s = torch.softmax(a, -1)
        G, Bt, Hm = model.g.detach(), model.beta.detach(), model.H.detach()      # (B, d), (B,), (K, B)
        nb = G.shape[0]
        w0 = model.w.detach().mean(0)                                           # (S,)
        kl = None
        if knn is not None:
            kl = knn_logit(knn)
            kl = kl if kl.ndim == 2 else kl[:, None]                            # (m, S)
    yt = torch.as_tensor(y, dtype=torch.float32)
    R = None if peer_residuals is None else torch.as_tensor(np.nan_to_num(peer_residuals, nan=0.0), dtype=torch.float32)
    gamma = torch.zeros(0 if R is None else R.shape[1], requires_grad=R is not None)
    wv = w0.clone().requires_grad_(fit_w and kl is not None)
    mix = torch.full((nb,), 1.0 / nb, requires_grad=prior == "span")
    dg = torch.zeros(G.shape[1], requires_grad=True)
    dh = torch.zeros(Hm.shape[0], requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    params = ([dg, dh, c] + ([mix] if prior == "span" else []) + ([wv] if wv.requires_grad else [])
              + ([gamma] if R is not None else []))
    opt = torch.optim.LBFGS(params, max_iter=steps, line_search_fn="strong_wolfe")

    def parts():
        return mix @ G + dg, mix @ Bt + c, Hm @ mix + dh

    def closure():
        opt.zero_grad()
        g, b, h = parts()
        logits = z @ g + b + s @ h + (kl @ wv if kl is not None else 0.0) + (R @ gamma if R is not None else 0.0)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt)
        if R is not None:
            loss = loss + l2 * gamma.pow(2).sum() / len(y)
        loss = loss + l2 * (dg.pow(2).sum() + dh.pow(2).sum() + (wv - w0).pow(2).sum()) / len(y)
        if prior == "span":
            # Mixing weights stay moderate: an extrapolation far outside the known models needs
            # more evidence than a few dozen results.
            loss = loss + l2 * (mix - 1.0 / nb).pow(2).sum() / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        g, b, h = parts()
    return g.numpy().copy(), float(b), h.numpy().copy(), wv.detach().numpy().copy()


def config_dict(cfg: CapabilityConfig) -> dict:
    return asdict(cfg)


def add_backend(model, g: npt.NDArray[np.float32], beta: float, h: npt.NDArray[np.float32], cfg: CapabilityConfig,
                w: npt.NDArray[np.float32] | None = None):
    """A copy of ``model`` with one more backend (g, beta, h from ``onboard``); the new backend's
    datastore weights are w (from ``onboard``), or the trained backends' mean. The prompt side is
    shared unchanged."""
    import torch

    B = model.g.shape[0]
    new = build_model(model.f[0].in_features, B + 1, cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["g"] = torch.cat([state["g"], torch.as_tensor(g, dtype=torch.float32)[None]])
    state["beta"] = torch.cat([state["beta"], torch.tensor([beta], dtype=torch.float32)])
    state["H"] = torch.cat([state["H"], torch.as_tensor(h, dtype=torch.float32)[:, None]], 1)
    w_new = state["w"].mean(0, keepdim=True) if w is None else torch.as_tensor(w, dtype=torch.float32)[None]
    state["w"] = torch.cat([state["w"], w_new])
    new.load_state_dict(state)
    new.eval()
    return new


def replace_backend(model, j: int, g: npt.NDArray[np.float32], beta: float, h: npt.NDArray[np.float32],
                    cfg: CapabilityConfig, w: npt.NDArray[np.float32] | None = None):
    """A copy of ``model`` with backend j's (g, beta, h) replaced (a re-onboarded backend); its
    datastore weights are replaced by w when given."""
    import torch

    new = build_model(model.f[0].in_features, model.g.shape[0], cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["g"][j] = torch.as_tensor(g, dtype=torch.float32)
    state["beta"][j] = float(beta)
    state["H"][:, j] = torch.as_tensor(h, dtype=torch.float32)
    if w is not None:
        state["w"][j] = torch.as_tensor(w, dtype=torch.float32)
    new.load_state_dict(state)
    new.eval()
    return new


# Loss-weight settings tried by ``train_selected``: the full objective and its ablations. The
# one with the lowest validation prediction loss is kept (on the real data sets validation loss
# ranks them as test AIQ does; see docs/routing_quality.md).
CANDIDATE_WEIGHTS: tuple[tuple[float, float], ...] = ((0.2, 0.1), (0.0, 0.0), (0.2, 0.0), (0.0, 0.1))


def train_selected(X, Y, Xv, Yv, cfg: CapabilityConfig, *, K=None, Kv=None, progress: bool = False,
                   candidates: tuple[tuple[float, float], ...] = CANDIDATE_WEIGHTS
                   ) -> tuple[TrainResult, CapabilityConfig, list[dict]]:
    """Train one model per (w_con, w_ot) candidate; return the best on validation loss, its config,
    and the table of every candidate's validation loss."""
    from dataclasses import replace

    best: tuple[TrainResult, CapabilityConfig] | None = None
    table = []
    for w_con, w_ot in candidates:
        c = replace(cfg, w_con=w_con, w_ot=w_ot)
        res = train(X, Y, Xv, Yv, c, K=K, Kv=Kv, progress=progress)
        table.append({"w_con": w_con, "w_ot": w_ot, "val_bce": res.best_val, "best_epoch": res.best_epoch,
                      "result": res})
        if best is None or res.best_val < best[0].best_val:
            best = (res, c)
    assert best is not None
    return best[0], best[1], table

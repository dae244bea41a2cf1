"""Invariants of the capability encoder on seeded toy data."""
import numpy as np
import pytest

from encoders.capability import CapabilityConfig, code_assignment, onboard, predict, sinkhorn_plan, train


def toy(n=600, d=16, B=3, seed=0):
    """Three prompt clusters; backend j is good on cluster j, so outcomes follow the clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(B, d)) * 3
    c = rng.integers(0, B, n)
    X = centers[c] + rng.normal(size=(n, d))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    p = np.full((n, B), 0.15)
    p[np.arange(n), c] = 0.9
    Y = (rng.random((n, B)) < p).astype(np.float32)
    return X, Y, c


@pytest.mark.parametrize("marginal", [[0.25] * 4, [0.5, 0.3, 0.1, 0.1]])
def test_sinkhorn_plan_respects_both_marginals(marginal):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 4)) * 3
    a[:, 0] += 5  # every prompt prefers code 0: the marginal must still hold
    m = np.array(marginal)
    plan = sinkhorn_plan(a, m, 0.05)
    np.testing.assert_allclose(plan.sum(1), 1.0, atol=1e-4)          # each prompt's mass
    np.testing.assert_allclose(plan.sum(0) / 200, m, atol=1e-3)      # each code's traffic share


def test_plain_and_log_domain_sinkhorn_give_the_same_plan():
    """sinkhorn_plan runs its own plain Sinkhorn where the kernel cannot underflow (POT's
    iterations without their checks) and POT's log-domain iterations below that regularization:
    the same plan as POT's plain and log-domain ones."""
    import ot
    import torch

    rng = np.random.default_rng(2)
    a = rng.normal(size=(256, 8)) * 4
    m = np.full(8, 1 / 8)
    plan = sinkhorn_plan(a, m, 0.05)
    M = -a - (-a).min()
    M = M / M.max()
    np.testing.assert_allclose(plan, ot.sinkhorn(np.full(256, 1 / 256), m, M, 0.05, method="sinkhorn", numItermax=500,
                                                 stopThr=1e-6) * 256, atol=1e-12)   # POT's, without its checks
    log_plan = ot.sinkhorn(torch.full((256,), 1 / 256, dtype=torch.float64), torch.as_tensor(m), torch.as_tensor(M),
                           0.05, method="sinkhorn_log", numItermax=500, stopThr=1e-6).numpy() * 256
    np.testing.assert_allclose(plan, log_plan, atol=1e-9)
    sharp = sinkhorn_plan(a, m, 1e-3)            # the log-domain path: exp(-1 / 1e-3) underflows
    assert np.isfinite(sharp).all()
    np.testing.assert_allclose(sharp.sum(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(sharp.sum(0) / 256, m, atol=5e-3)    # 500 iterations: close, not exact


@pytest.mark.slow  # trains capability models for seconds
def test_training_loss_falls_and_predictions_follow_the_clusters():
    X, Y, c = toy()
    cfg = CapabilityConfig(dim=16, hidden=32, codes=3, max_epochs=60, patience=60, seed=0)
    res = train(X[:500], Y[:500], X[500:], Y[500:], cfg)
    h = res.history
    assert h[-1]["pred"] < h[0]["pred"] * 0.8 and res.best_val < h[0]["val_bce"]
    assert all(k in h[0] for k in ("pred", "con", "ot"))
    P = predict(res.model, X[500:])
    assert (P.argmax(1) == c[500:]).mean() > 0.8  # labels are noisy (p = 0.9 / 0.15)


@pytest.mark.slow  # trains capability models for seconds
def test_ot_term_keeps_codes_from_collapsing():
    X, Y, _ = toy()
    with_ot = train(X[:500], Y[:500], X[500:], Y[500:], CapabilityConfig(dim=16, hidden=32, codes=3, max_epochs=40,
                                                                          patience=40, w_ot=1.0, seed=0))
    share = code_assignment(with_ot.model, X).argmax(1)
    counts = np.bincount(share, minlength=3) / len(X)
    assert counts.min() > 0.15, counts  # every code keeps a real share of the traffic


@pytest.fixture(scope="module")
def trained_toy():
    X, Y, c = toy(n=900)
    cfg = CapabilityConfig(dim=16, hidden=32, codes=3, max_epochs=60, patience=60, seed=0)
    return X, Y, c, train(X[:600], Y[:600], X[600:700], Y[600:700], cfg).model


@pytest.mark.slow  # trains capability models for seconds
@pytest.mark.parametrize("prior", ["span", "mean"])
def test_onboarding_a_seen_backend_recovers_its_trained_behaviour(prior, trained_toy):
    X, Y, c, m = trained_toy
    j = 1
    g, b, h, _ = onboard(m, X[:100], Y[:100, j], prior=prior)  # its results on 100 aptitude prompts
    import torch

    with torch.no_grad():
        trained = predict(m, X[700:])[:, j]
        _, z, a = m(torch.as_tensor(X[700:]))
        onboarded = torch.sigmoid(z @ torch.as_tensor(g) + b + torch.softmax(a, -1) @ torch.as_tensor(h)).numpy()
    assert np.corrcoef(trained, onboarded)[0, 1] > 0.9
    # (g, beta, h) are not identifiable one by one (beta and h trade off), so the test compares
    # behaviour: against the true probabilities the onboarded backend is no worse than the trained one.
    truth = np.where(c[700:] == j, 0.9, 0.15)
    assert np.abs(onboarded - truth).mean() <= np.abs(trained - truth).mean() + 0.02


def test_kmeans_aptitude_selection_covers_every_cluster():
    from router.offline.training import select_aptitude

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 32))
    sizes = [400] + [20] * 9                      # one dominant cluster and nine small ones
    X = np.concatenate([c + 0.05 * rng.normal(size=(k, 32)) for c, k in zip(centers, sizes)]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    label = np.repeat(np.arange(10), sizes)
    km = select_aptitude(X, 20, seed=0, method="kmeans")
    assert len(km) == 20 and len(set(km.tolist())) == 20
    assert len(set(label[km].tolist())) == 10     # every cluster is tested
    rnd = select_aptitude(X, 20, seed=0, method="random")
    assert len(set(rnd.tolist())) == 20


def test_several_knn_neighbourhoods_as_inputs_and_onboarding_keeps_their_weights():
    import torch

    from encoders.capability import add_backend

    X, Y, c = toy(n=400)
    rng = np.random.default_rng(1)
    K = np.clip(np.stack([Y + rng.normal(0, 0.2, Y.shape), np.full_like(Y, 0.5)], -1), 0.01, 0.99).astype(np.float32)
    cfg = CapabilityConfig(dim=8, hidden=16, codes=2, max_epochs=30, patience=30, knn_scales=[[0, 0], [64, 1.0]])
    res = train(X[:300], Y[:300], X[300:], Y[300:], cfg, K=K[:300], Kv=K[300:])
    m = res.model
    assert tuple(m.w.shape) == (Y.shape[1], 2) and m.knn_scales == [[0, 0], [64, 1.0]]
    # The informative neighbourhood earns the larger weight.
    assert (m.w[:, 0] > m.w[:, 1]).all()
    p = predict(m, X[300:], K[300:])
    assert p.shape == (100, Y.shape[1]) and np.isfinite(p).all()
    g, b, h, w = onboard(m, X[:50], Y[:50, 0], knn=K[:50, 0], fit_w=False)
    new = add_backend(m, g, b, h, cfg, w)
    assert tuple(new.w.shape) == (Y.shape[1] + 1, 2)
    torch.testing.assert_close(new.w[-1], m.w.mean(0))
    # Fitted, the weights move towards the neighbourhood that predicts this backend's results.
    w_fit = onboard(m, X[:50], Y[:50, 0], knn=K[:50, 0])[3]
    w_mean = m.w.detach().mean(0)
    assert w_fit[0] - w_fit[1] > float(w_mean[0] - w_mean[1])
    assert predict(new, X[:5], np.concatenate([K[:5], K[:5, :1]], 1)).shape == (5, Y.shape[1] + 1)


def test_ranking_term_orders_backends_per_prompt():
    import torch

    from encoders.capability import ranking_loss

    y = torch.tensor([[1.0, 0.0, 0.5]])
    m = torch.ones_like(y)
    good = ranking_loss(torch.tensor([[3.0, -3.0, 0.0]]), y, m)
    bad = ranking_loss(torch.tensor([[-3.0, 3.0, 0.0]]), y, m)
    assert good < 0.1 < bad
    # Unobserved scores take no part.
    assert ranking_loss(torch.tensor([[-3.0, 3.0, 0.0]]), y, torch.tensor([[1.0, 0.0, 0.0]])) == 0


def test_the_numpy_serving_copy_computes_what_the_torch_model_computes():
    from encoders.capability import FrozenCapability, build_model

    cfg = CapabilityConfig(dim=8, hidden=16, codes=3, knn_scales=[[0, 0], [64, 1.0]])
    m = build_model(16, 4, cfg).eval()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(7, 16)).astype(np.float32)
    K = rng.uniform(0, 1, (7, 4, 2)).astype(np.float32)
    frozen = FrozenCapability(m)
    np.testing.assert_allclose(frozen.predict(X, K), predict(m, X, K), atol=1e-5)
    np.testing.assert_allclose(frozen.predict(X), predict(m, X), atol=1e-5)


@pytest.mark.slow  # trains capability models for seconds
def test_peers_residuals_correct_the_level_fitted_on_a_lucky_aptitude_sample():
    """Every backend's outcome also depends on a per-prompt factor u the embedding does not carry.
    An aptitude sample drawn where u is high makes a new backend look better than it is; the
    trained backends were lucky on the same prompts, and their residuals as control variates take
    a good part of that bias out of the fitted level (not all: each peer's residual on one prompt
    is a noisy reading of u, which attenuates its coefficient)."""
    import torch
    from scipy.special import expit

    rng = np.random.default_rng(3)
    n, d, B = 1600, 16, 3
    centers = rng.normal(size=(B, d)) * 3
    c = rng.integers(0, B, n)
    X = centers[c] + rng.normal(size=(n, d))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    u = rng.normal(size=n)
    base = np.full((n, B + 1), -1.0)
    base[np.arange(n), c] = 1.5
    base[:, B] = np.where(c == 1, 1.0, -0.5)             # the new backend: like backend 1, a bit weaker
    P = expit(base + 1.5 * u[:, None])
    Y = (rng.random(P.shape) < P).astype(np.float32)
    cfg = CapabilityConfig(dim=16, hidden=32, codes=3, max_epochs=60, patience=60, seed=0)
    m = train(X[:800], Y[:800, :B], X[800:1000], Y[800:1000, :B], cfg).model
    pool = np.arange(1000, 1300)
    apt = pool[u[pool] > 0.3][:80]                        # a lucky sample
    R = Y[apt, :B] - predict(m, X[apt])
    assert R.mean() > 0.05                                 # the trained backends were lucky too
    test = np.arange(1300, n)

    def level(peer_residuals):
        g, b, h, _ = onboard(m, X[apt], Y[apt, B], peer_residuals=peer_residuals)
        with torch.no_grad():
            _, z, a = m(torch.as_tensor(X[test]))
            return float(torch.sigmoid(z @ torch.as_tensor(g) + b + torch.softmax(a, -1) @ torch.as_tensor(h)).mean())

    truth = float(P[test, B].mean())
    plain, corrected = level(None), level(R)
    assert plain - truth > 0.05                            # the sample's luck, fitted as skill
    assert abs(corrected - truth) < 0.75 * abs(plain - truth), (truth, plain, corrected)

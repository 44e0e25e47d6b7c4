"""The measuring instruments of evaluate.py against closed forms and their contracts.

- frechet_distance: features built to have an exact sample mean and covariance give the
  closed-form distance between the two Gaussians (1-D, diagonal, 2-D and general D).
- frechet_vs_real: the real-vs-real floor and the generated side are compared at the same
  sample size, for n below, at and above |A|. The features are 64-dimensional with about
  100 samples, where the finite-sample distance depends strongly on n (~22 at 100 vs ~15
  at 300), so a floor taken at another size shows.
- evaluate_images / real_halves / style_measures / within_digit_spread: accuracy, confidence,
  the halves, the handwriting measures and the spread on inputs whose answers are known.
"""
import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

import evaluate


@pytest.fixture(autouse=True)
def one_thread():
    """64 x 64 eigendecompositions: one BLAS thread is as fast, and far faster on a busy machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


def gaussian_features(n, mean, cov, seed=0):
    """n rows with sample mean exactly `mean` and sample covariance (ddof = 1) exactly `cov`."""
    rng = np.random.default_rng(seed)
    mean, cov = np.atleast_1d(np.asarray(mean, float)), np.atleast_2d(np.asarray(cov, float))
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False, ddof=1)).T)   # whitened exactly
    return z @ np.linalg.cholesky(cov).T + mean


def closed_form(mu_a, s_a, mu_b, s_b):
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with scipy's matrix square root."""
    mu_a, mu_b = np.atleast_1d(mu_a), np.atleast_1d(mu_b)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    root = linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root).real)


def test_frechet_of_isotropic_gaussians_is_mean_and_std_difference():
    """S = sd^2 I in D dimensions: |mu_a - mu_b|^2 + D (sd_a - sd_b)^2."""
    a = gaussian_features(500, [0.3, 0.0, 1.0], 0.25 * np.eye(3))
    b = gaussian_features(400, [-0.2, 0.0, 1.0], 4.0 * np.eye(3), seed=1)
    expected = (0.3 - -0.2) ** 2 + 3 * (0.5 - 2.0) ** 2
    assert abs(evaluate.frechet_distance(a, b) - expected) < 1e-9 * expected


def test_frechet_of_diagonal_gaussians():
    va, vb = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 1.0, 1.0])
    mu_a, mu_b = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 1.0, 0.0, 0.0])
    a, b = gaussian_features(300, mu_a, np.diag(va)), gaussian_features(200, mu_b, np.diag(vb), seed=1)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert abs(evaluate.frechet_distance(a, b) - expected) < 1e-8


def test_frechet_of_2d_gaussians_with_non_commuting_covariances():
    """Tr (S_a S_b)^(1/2) for 2 x 2: sqrt(Tr(S_a S_b) + 2 sqrt(det(S_a S_b)))."""
    s_a, s_b = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[1.0, -0.6], [-0.6, 3.0]])
    assert not np.allclose(s_a @ s_b, s_b @ s_a)
    mu_a, mu_b = np.array([0.2, -0.1]), np.array([-0.3, 0.4])
    a, b = gaussian_features(250, mu_a, s_a), gaussian_features(350, mu_b, s_b, seed=1)
    m = s_a @ s_b
    tr_root = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_root
    got = evaluate.frechet_distance(a, b)
    assert abs(got - expected) < 1e-8, (got, expected)
    assert abs(evaluate.frechet_distance(b, a) - expected) < 1e-8          # symmetric


def test_frechet_of_general_gaussians_matches_scipy_sqrtm():
    rng = np.random.default_rng(3)
    D = 6
    ma, mb = rng.normal(size=(D, D)), rng.normal(size=(D, D))
    s_a, s_b = ma @ ma.T / D + 0.1 * np.eye(D), mb @ mb.T / D + 0.1 * np.eye(D)
    mu_a, mu_b = rng.normal(size=D), rng.normal(size=D)
    a, b = gaussian_features(400, mu_a, s_a), gaussian_features(300, mu_b, s_b, seed=1)
    expected = closed_form(mu_a, s_a, mu_b, s_b)
    assert abs(evaluate.frechet_distance(a, b) - expected) < 1e-7 * max(1.0, expected)
    assert abs(evaluate.frechet_distance(a, a)) < 1e-9


# ----- the floor and the generated side at the same n -----

D, N_HALF = 64, 100


def real_halves_iid(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N_HALF, D)), rng.normal(size=(N_HALF + 1, D))   # |B| may be |A| + 1


@pytest.mark.parametrize("n", [60, N_HALF])
def test_real_digits_scored_as_generated_sit_exactly_on_the_floor(n):
    """n <= |A|: generated features that ARE the floor's real sample (in another order)
    must get exactly the floor, and the floor is A at size n against B."""
    half_a, half_b = real_halves_iid()
    gen = half_a[:n][np.random.default_rng(5).permutation(n)]
    got, floor = evaluate.frechet_vs_real(gen, half_a, half_b)
    assert abs(floor - evaluate.frechet_distance(half_a[:n], half_b)) < 1e-9, "floor at the generated n"
    assert abs(got - floor) < 1e-8 * floor, f"same sample, different scores: {got} vs floor {floor}"
    if n < N_HALF:                                       # and the size really matters here
        assert evaluate.frechet_distance(half_a, half_b) < 0.9 * floor


@pytest.mark.parametrize("n", [60, N_HALF, 2 * N_HALF + 50, 3 * N_HALF])
def test_generated_from_the_real_distribution_scores_like_the_floor(n):
    """Generated features drawn from the real distribution: on average over its chunks the
    generated side matches the floor (ratio 0.99 +- 0.02 here), while a floor at another
    size would be off by ~30% (the distance at 100 vs 300 samples: ~22 vs ~15)."""
    half_a, half_b = real_halves_iid(seed=1)
    gen = np.random.default_rng(2).normal(size=(n, D))
    got, floor = evaluate.frechet_vs_real(gen, half_a, half_b)
    assert 0.9 < got / floor < 1.1, f"n={n}: generated {got:.2f} vs floor {floor:.2f}"
    k = min(n, N_HALF)
    assert abs(floor - evaluate.frechet_distance(half_a[:k], half_b)) < 1e-9


def test_more_generated_samples_do_not_lower_the_score():
    """n > |A| is scored in chunks of |A|: duplicating the generated set changes nothing in
    expectation, unlike one big sample (which would look better than the floor)."""
    half_a, half_b = real_halves_iid(seed=2)
    gen = np.random.default_rng(3).normal(size=(3 * N_HALF, D))
    got, floor = evaluate.frechet_vs_real(gen, half_a, half_b)
    assert evaluate.frechet_distance(gen, half_b) < 0.8 * got       # the trap the chunks avoid


def test_generated_samples_are_mixed_before_chunking():
    """Samples arrive grouped by label (all 0s, then all 1s, ...). Chunks of |A| cut from
    them in that order would each hold one label only and look far from the real mixture;
    mixed first, each chunk is a fair sample."""
    rng = np.random.default_rng(4)
    centres = np.zeros((2, D))
    centres[1, 0] = 6.0                                               # two well-separated "labels"
    real = lambda n: centres[rng.integers(0, 2, n)] + rng.normal(size=(n, D))
    half_a, half_b = real(N_HALF), real(N_HALF)
    gen = np.concatenate([centres[0] + rng.normal(size=(N_HALF, D)),
                          centres[1] + rng.normal(size=(N_HALF, D))])   # grouped by label
    got, floor = evaluate.frechet_vs_real(gen, half_a, half_b)
    assert 0.85 < got / floor < 1.15, f"generated {got:.2f} vs floor {floor:.2f}"


# ----- halves, accuracy, confidence, style measures -----

class LogitsInPixels(nn.Module):
    """A stand-in classifier: the first 10 pixels of row 0 are its logits, and its features."""

    def features(self, x):
        return x[:, 0, 0, :10]

    def head(self, f):
        return f


def images_with_logits(logits):
    x = torch.zeros(len(logits), 1, 28, 28)
    x[:, 0, 0, :10] = logits
    return x


def test_real_halves_split_the_set_in_two():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(41, 10, generator=g)
    a, b = evaluate.real_halves(real)
    assert len(a) == 20 and len(b) == 21
    both = np.concatenate([a, b])
    assert np.array_equal(np.sort(both, axis=0), np.sort(real.numpy(), axis=0))
    assert not np.array_equal(a, real[:20].numpy()), "a random split, not the first half"


def test_within_digit_spread_is_the_mean_ratio_of_variances_per_digit():
    """Digit d: 3 + d generated and 12 real feature vectors whose sample covariances (ddof = 1)
    are exactly k_d^2 s_d^2 I and s_d^2 I, so the spread is the plain mean of the k_d^2 over the
    digits -- whatever the counts, which differ, and whatever the real variances, which differ
    too. The real set itself gives 1, one image per digit copied gives 0, and a digit with one
    image, or whose real digits do not vary, is left out."""
    k, s_ = np.linspace(0.5, 1.4, 10), np.linspace(0.5, 2.0, 10)
    per_digit = [(gaussian_features(3 + d, [d, 0.0], (k[d] * s_[d]) ** 2 * np.eye(2), seed=d),
                  gaussian_features(12, [d, 1.0], s_[d] ** 2 * np.eye(2), seed=10 + d)) for d in range(10)]
    gen_f = torch.from_numpy(np.concatenate([g for g, _ in per_digit]))
    real_f = torch.from_numpy(np.concatenate([r for _, r in per_digit]))
    gen_y = torch.cat([torch.full((3 + d,), d) for d in range(10)])
    real_y = torch.arange(10).repeat_interleave(12)
    spread = evaluate.within_digit_spread
    assert abs(spread(gen_f, gen_y, real_f, real_y) - (k ** 2).mean()) < 1e-9
    assert abs(spread(real_f, real_y, real_f, real_y) - 1.0) < 1e-12
    assert spread(real_f[real_y * 12], real_y, real_f, real_y) == 0.0     # each digit's first image, 12 times
    keep = (gen_y != 3) | (torch.arange(len(gen_y)) == 9)            # digit 3 left with one image
    assert abs(spread(gen_f[keep], gen_y[keep], real_f, real_y) - (k[np.arange(10) != 3] ** 2).mean()) < 1e-9
    flat = real_f.clone()
    flat[real_y == 5] = 7.0                                          # real 5s that do not vary at all
    assert abs(spread(gen_f, gen_y, flat, real_y) - (k[np.arange(10) != 5] ** 2).mean()) < 1e-9
    assert spread(real_f[:1], real_y[:1], real_f, real_y) is None


def test_evaluate_images_takes_the_spread_over_digits_the_judge_reads_right():
    """A wrong digit is not variety: images the judge reads as another label are left out of
    the spread, on the generated and on the real side alike."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(10).repeat_interleave(6)
    logits = torch.randn(60, 10, generator=g) + 8 * nn.functional.one_hot(y, 10)   # all read right
    real_logits = torch.randn(60, 10, generator=g) + 8 * nn.functional.one_hot(y, 10)
    wrong = torch.arange(60) % 6 == 0                                # one image per digit reads as d + 1
    logits[wrong] = logits[wrong].roll(1, dims=1)
    real_logits[torch.arange(60) % 6 == 1] = real_logits[torch.arange(60) % 6 == 1].roll(1, dims=1)
    clf = LogitsInPixels()
    r = evaluate.evaluate_images(clf, images_with_logits(logits), y, images_with_logits(real_logits), y)
    real_right = torch.arange(60) % 6 != 1
    expected = evaluate.within_digit_spread(logits[~wrong], y[~wrong], real_logits[real_right], y[real_right])
    assert abs(r["spread"] - expected) < 1e-6
    assert abs(r["spread"] - evaluate.within_digit_spread(logits, y, real_logits, y)) > 0.05
    assert "spread" not in evaluate.evaluate_images(clf, images_with_logits(logits), y, images_with_logits(real_logits))


def test_evaluate_images_accuracy_and_confidence():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(30, 10, generator=g)
    y = torch.arange(30) % 10
    x = images_with_logits(logits)
    real = images_with_logits(torch.randn(40, 10, generator=g))
    r = evaluate.evaluate_images(LogitsInPixels(), x, y, real)
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    assert r["n"] == 30
    assert abs(r["accuracy"] - (pred == y).float().mean().item()) < 1e-7
    assert abs(r["confidence"] - probs[torch.arange(30), y].mean().item()) < 1e-6
    for d in range(10):
        assert abs(r["per_digit_accuracy"][d] - (pred[y == d] == d).float().mean().item()) < 1e-7
    assert 0 < r["accuracy"] < 1                                    # neither extreme: the test can see errors


def test_style_measures_of_known_strokes():
    """A one-pixel stroke c = c0 - s (r - r0) leans right with slant exactly s; ink counts pixels > 0."""
    x = -torch.ones(3, 1, 28, 28)
    for r in range(6, 22):
        x[0, 0, r, 14] = 1.0                         # vertical: slant 0
        x[1, 0, r, 14 - (r - 14)] = 1.0              # one column right per row up: slant 1
        x[2, 0, r, 14 + (r - 14) // 2] = 0.5         # leaning left, half a column per row, grey
    vertical, right, left = (evaluate.style_measures(x[i:i + 1]) for i in range(3))
    assert abs(vertical["slant"]) < 1e-12 and abs(right["slant"] - 1.0) < 1e-12
    assert -0.6 < left["slant"] < -0.4
    assert abs(vertical["ink"] - 16 / 784) < 1e-12
    assert abs(evaluate.style_measures(x)["ink"] - 3 * 16 / (3 * 784)) < 1e-12


def test_stroke_measures_count_specks_and_grey_rims():
    """spur: ink pixels with at most one ink neighbour, over all ink; edge: grey (drawn, not ink)
    pixels over all drawn ones. Known images give known shares."""
    x = -torch.ones(2, 1, 28, 28)
    x[0, 0, 8:20, 10:13] = 1.0                       # a clean bar, 3 wide: no spur, no rim
    x[0, 0, 2, 2] = 1.0                              # one speck: 0 neighbours
    x[0, 0, 25, 5:7] = 1.0                           # a two-pixel whisker: 1 neighbour each
    x[1, 0, 8:20, 10:13] = 1.0
    x[1, 0, 8:20, 9] = -0.5                          # a grey rim left of the bar (drawn, not ink)
    x[1, 0, 8:20, 13] = -0.95                        # fainter than 5% grey: not drawn
    speckled, rimmed = (evaluate.stroke_measures(x[i:i + 1]) for i in range(2))
    assert abs(speckled["spur"] - 3 / 39) < 1e-7 and speckled["edge"] == 0.0
    assert rimmed["spur"] == 0.0 and abs(rimmed["edge"] - 12 / 48) < 1e-7
    assert abs(evaluate.style_measures(x)["spur"] - 3 / 75) < 1e-7      # over all images' ink together

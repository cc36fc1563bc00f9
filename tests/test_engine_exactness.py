"""The fast paths of the torch k-means change no assignment: bfloat16 screening and Yinyang bounds
against the plain float32 GEMM, on generated hostile data (near-ties, duplicates, scales)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sslbench.engine import seeding
from sslbench.engine.bounds import Bounds, round_down
from sslbench.engine.gemm import symmetric_gram
from sslbench.engine.kmeans import TorchKMeans, update_centres
from sslbench.engine.nearest import Nearest, Screening, closest_centres
from sslbench.engine.options import TorchOptions
from sslbench.engine.seeding import kmeans_plus_plus
from sslbench.errors import SSLBenchError
from sslbench.interfaces import ClustererConfig
from sslbench.threads import SMALL_WORK, _cgroup_quota, available_cores, compute_threads, torch_threads

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@st.composite
def hostile_rows(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Centres, and rows on the hyperplanes between pairs of them (ties up to rounding), copies of
    centres, duplicated centres, zero rows and ordinary rows, at one of many scales."""
    k = draw(st.integers(2, 24))
    d = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    # Down to where float32 and bfloat16 GEMMs flush to zero, up to where squares near float32's top.
    scale = 2.0 ** draw(st.integers(-75, 55))
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * scale
    if draw(st.booleans()):
        centers[rng.integers(k)] = centers[rng.integers(k)]  # duplicated centre: exact ties
    pairs = rng.integers(0, k, size=(64, 2))
    t = rng.uniform(0.0, 1.0, size=(64, 1))
    midpoints = 0.5 * (centers[pairs[:, 0]] + centers[pairs[:, 1]])
    jitter = rng.normal(size=midpoints.shape) * scale * 10.0 ** draw(st.integers(-9, -2))
    rows = np.concatenate(
        [
            midpoints + jitter,
            t * centers[pairs[:, 0]] + (1 - t) * centers[pairs[:, 1]],
            centers,
            np.zeros((2, d)),
            rng.normal(size=(32, d)) * scale,
        ]
    )
    return rows.astype(np.float32), centers.astype(np.float32)


@SETTINGS
@given(hostile_rows())
def test_bfloat16_screening_gives_the_float32_labels(case):
    rows, centers = (torch.from_numpy(a) for a in case)
    center_sq = (centers * centers).sum(dim=1)
    plain = closest_centres(rows, centers, center_sq)[0]
    exact = Nearest(centers, Screening(False)).closest(rows)
    screened = Nearest(centers, Screening(True, adaptive=False)).closest(rows)
    assert torch.equal(screened, exact)
    # The exact labels are those of float64 squared distances (ties to the lowest index)...
    distance = ((rows.double()[:, None, :] - centers.double()[None]) ** 2).sum(dim=2)
    reference = distance.min(dim=1)
    assert bool((distance.gather(1, exact[:, None])[:, 0] == reference.values).all())
    # ...and the float32 GEMM's wherever its own rounding does not decide.
    assert int((exact != plain).sum()) <= int((screened != plain).sum())


@SETTINGS
@given(hostile_rows(), st.booleans())
def test_scores_are_within_their_error_bound(case, screen):
    rows, centers = (torch.from_numpy(a) for a in case)
    norms = torch.linalg.vector_norm(rows, dim=1)
    nearest = Nearest(centers, Screening(screen, adaptive=False))
    scores, screened = nearest.scores(rows)
    assert screened == screen
    exact = (centers.double() ** 2).sum(dim=1)[None, :] - 2 * rows.double() @ centers.double().T
    error = (scores.double() - exact).abs()
    assert bool((error <= nearest.bounds(norms, screen).double()).all())
    assert bool((error <= nearest.row_bounds(norms, screen).double()[:, None]).all())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 40),
    duplicates=st.booleans(),
    ratio=st.sampled_from([0.0, 0.01, 0.5]),
)
def test_pruned_and_screened_fits_equal_the_plain_fit(seed, k, duplicates, ratio):
    """Centres bit for bit, across Yinyang bounds and bfloat16 screening, with duplicate rows (duplicate
    centres, exact ties) and re-seeding all along."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(6, 12)) * 4)[rng.integers(0, 6, 600)] + rng.normal(size=(600, 12))
    if duplicates:
        x[::3] = x[0]
    x = x.astype(np.float32)
    fits = {}
    for prune, screen in [(False, False), (True, False), (False, True), (True, True)]:
        options = TorchOptions(prune=prune, screen=screen, reassignment_ratio=ratio)
        kmeans = TorchKMeans(ClustererConfig(k, 6, 64, seed % 1000, options=options))
        kmeans.fit(x)
        fits[prune, screen] = kmeans
    plain = fits[False, False]
    for kmeans in fits.values():
        assert torch.equal(kmeans.centers, plain.centers)
        assert np.array_equal(kmeans.predict(x), plain.predict(x))


def test_yinyang_bounds_settle_most_rows_once_centres_settle():
    """On separated blobs, after the first epochs, the group bounds skip most rows (the point of them)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 32)) * 6)[rng.integers(0, 40, 8000)] + rng.normal(size=(8000, 32))
    kmeans = TorchKMeans(ClustererConfig(40, 12, 512, 0, options=TorchOptions(prune=True, screen=False)))
    kmeans.fit(x.astype(np.float32))
    assert kmeans.pruned_rows > 0.5 * 12 * len(x)


@SETTINGS
@given(st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=1, max_size=50))
def test_round_down_never_rounds_up(values):
    exact = torch.tensor(values, dtype=torch.float64)
    low = round_down(exact)
    assert low.dtype == torch.float32
    assert bool((low.double() <= exact).all())
    assert bool((exact - low.double() <= exact.abs() * 2**-23 + 2**-149).all())


def test_centre_groups_cover_every_centre():
    centers = torch.randn(300, 8)
    bounds = Bounds(10, centers)
    assert bounds.n_groups == 30
    assert bounds.group.shape == (300,)
    assert int(bounds.group.min()) >= 0 and int(bounds.group.max()) < 30


def test_small_products_run_on_one_thread_and_large_ones_on_at_most_the_available_cores():
    assert compute_threads(SMALL_WORK - 1, 8) == 1
    assert compute_threads(SMALL_WORK, 1) == 1  # the user's choice of one thread stands
    assert compute_threads(SMALL_WORK, 10_000) == available_cores()
    before = torch.get_num_threads()
    with torch_threads(10.0) as inside:
        assert inside == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000"}, None),
        ({"cpu.max": "150000 100000"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota_is_read_from_either_cgroup_version(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert _cgroup_quota(tmp_path) == expected


def test_kmeans_plus_plus_picks_the_same_centres_from_the_distance_matrix(monkeypatch):
    """The precomputed distance matrix is a speed-up only: on blobs both ways choose the same rows."""
    rng = np.random.default_rng(5)
    sample = torch.from_numpy((rng.normal(size=(30, 16)) * 5)[rng.integers(0, 30, 900)] + rng.normal(size=(900, 16)))
    sample = sample.float()
    with_matrix = kmeans_plus_plus(sample, 40, torch.Generator().manual_seed(3))
    monkeypatch.setattr(seeding, "GRAM_BYTES", 0)
    without = kmeans_plus_plus(sample, 40, torch.Generator().manual_seed(3))
    assert torch.equal(with_matrix, without)


@st.composite
def bound_walks(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]]]:
    """Rows, centres, and a walk of steps: visit a batch of rows, move some centres a little or far,
    or re-seed some centres onto rows (a burst small enough to be tracked, or large enough to fold)."""
    n, k, d = draw(st.integers(20, 120)), draw(st.integers(2, 30)), draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 4
    rows = centers[rng.integers(0, k, n)] + rng.normal(size=(n, d))
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["visit", "visit", "drift", "jump", "reseed", "burst"]), st.integers(0, 2**31 - 1)
            ),
            min_size=4,
            max_size=30,
        )
    )
    return rows.astype(np.float32), centers.astype(np.float32), steps


@pytest.fixture(scope="module")
def tracked() -> list[int]:
    """Tracked bursts per walk, to show the walks reach the catch-up path."""
    return []


@settings(SETTINGS, max_examples=150)
@given(walk=bound_walks(), screen=st.booleans())
def test_yinyang_bounds_give_the_exact_labels_through_drift_and_reseeding(walk, screen, tracked):
    """Whatever the centres do between visits — small moves, far moves, re-seeding bursts tracked or
    folded — every visit returns the labels of float64 brute force (ties to the lowest index), and
    every stored bound still holds against the exact distances (except, as designed, towards centres
    re-seeded since a row's last visit, which it catches up with at the next)."""
    rows, start, steps = walk
    x, centers = torch.from_numpy(rows), torch.from_numpy(start).clone()
    bounds = Bounds(len(x), centers)
    screening = Screening(screen, adaptive=False)
    for kind, seed in steps:
        rng = np.random.default_rng(seed)
        if kind == "visit":
            size = rng.integers(1, len(x) + 1) if rng.random() < 0.3 else rng.integers(1, len(x) // 3 + 2)
            local = torch.from_numpy(np.sort(rng.choice(len(x), size, replace=False)))
            labels = bounds.labels(local, x[local], centers, screening)
            distance = ((x[local].double()[:, None, :] - centers.double()[None]) ** 2).sum(dim=2)
            assert torch.equal(labels, torch.from_numpy(distance.numpy().argmin(axis=1)))
        else:
            before = centers.clone()
            if kind == "reseed":  # one or two centres: a burst the bounds track
                chosen = torch.zeros(len(centers), dtype=torch.bool)
                chosen[torch.from_numpy(rng.integers(0, len(centers), 2))] = True
            else:
                chosen = torch.from_numpy(rng.random(len(centers)) < (0.9 if kind == "burst" else 0.3))
            if kind in ("reseed", "burst"):
                targets = x[torch.from_numpy(rng.integers(0, len(x), len(centers)))]
                targets = targets + torch.from_numpy(rng.normal(size=targets.shape) * 0.3).float()
                centers[chosen] = targets[chosen]
            else:
                scale = 0.05 if kind == "drift" else 5.0
                centers[chosen] += torch.from_numpy(
                    rng.normal(size=(int(chosen.sum()), centers.shape[1])) * scale
                ).float()
            movement = torch.linalg.vector_norm(centers.double() - before.double(), dim=1)
            if kind in ("reseed", "burst"):
                bounds.reseed(movement)
            else:
                bounds.moved(movement)
        _assert_bounds_hold(bounds, x, centers)
    tracked.append(len(bounds.bursts))


def test_the_walks_reach_tracked_bursts(tracked):
    """Runs after the walks (file order): some of them tracked a burst, so catch-ups were exercised."""
    assert sum(n > 0 for n in tracked) >= 5


def _assert_bounds_hold(bounds: Bounds, x: torch.Tensor, centers: torch.Tensor) -> None:
    seen = torch.nonzero(bounds.label >= 0).flatten()
    distance = torch.cdist(x[seen].double(), centers.double())
    own = bounds.label[seen]
    upper = bounds.upper[seen] + bounds.drift[own] - bounds.drift_at[seen]
    assert bool((distance.gather(1, own[:, None])[:, 0] <= upper * (1 + 1e-9) + 1e-9).all())
    lower = bounds.lower[seen].double() - bounds.group_drift
    for i, row in enumerate(seen.tolist()):
        pending = torch.cat([torch.zeros(0, dtype=torch.int64), *bounds.bursts[int(bounds.caught_up[row]) :]])
        for g in range(bounds.n_groups):
            members = torch.nonzero(bounds.group == g).flatten()
            members = members[(members != own[i]) & ~torch.isin(members, pending)]
            if len(members):
                assert float(distance[i, members].min()) >= float(lower[i, g]) - 1e-9 * (1 + abs(float(lower[i, g])))


def test_screening_turns_itself_off_where_bfloat16_settles_few_rows_and_back_on():
    """On one Gaussian cloud the nearest centres crowd and the bfloat16 bound settles few rows:
    screening stops (its share measured all along); on separated blobs it resumes. The labels are
    float64 brute force's throughout."""
    rng = np.random.default_rng(0)
    crowded = torch.from_numpy(rng.normal(size=(4096, 256))).float()
    centers = torch.from_numpy(rng.normal(size=(500, 256))).float()
    screening = Screening(True)
    nearest = Nearest(centers, screening)
    labels = torch.cat([nearest.closest(chunk) for chunk in crowded.split(256)])
    assert not screening.active()
    assert torch.equal(labels, torch.cdist(crowded.double(), centers.double()).argmin(dim=1))
    separated = centers[torch.from_numpy(rng.integers(0, 500, 8192))] + 1e-3 * torch.randn(8192, 256)
    labels = torch.cat([nearest.closest(chunk) for chunk in separated.split(256)])
    assert screening.active()
    assert torch.equal(labels, torch.cdist(separated.double(), centers.double()).argmin(dim=1))


@SETTINGS
@given(n=st.integers(1, 2100), d=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_symmetric_gram_is_the_product_with_the_transpose(n, d, seed):
    """The k-means++ Gram matrix from upper blocks and their mirror: within float32 rounding of the
    float64 product everywhere (the mirrored blocks included)."""
    rows = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d))).float()
    gram = symmetric_gram(rows)
    exact = rows.double() @ rows.double().T
    scale = (rows.double() ** 2).sum(dim=1)
    bound = 1.01 * (d + 2) * 2.0**-24 * torch.sqrt(scale[:, None] * scale[None, :])
    assert bool(((gram.double() - exact).abs() <= bound).all())


@SETTINGS
@given(
    k=st.integers(1, 12),
    d=st.integers(1, 64),
    scale=st.integers(-20, 20),
    count_exponent=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_centre_update_bounds_how_far_each_centre_moved(k, d, scale, count_exponent, seed):
    """The movement the update reports is at least the float64 distance each centre actually moved,
    float32 rounding of the moved centre included (large counts make steps of a few ulps)."""
    rng = np.random.default_rng(seed)
    centers = torch.from_numpy(rng.normal(size=(k, d)) * 2.0**scale).float()
    counts = torch.from_numpy(rng.integers(0, 2**count_exponent + 1, k)).double()
    batch_counts = torch.from_numpy(rng.integers(0, 3, k)).double()
    rows = centers.double() + torch.from_numpy(rng.normal(size=(k, d)) * 2.0**scale * 1e-3)
    sums = (rows * batch_counts[:, None]).float()
    before = centers.clone()
    movement = update_centres(centers, counts + batch_counts, sums, batch_counts, bound=True)
    assert movement is not None
    actual = torch.linalg.vector_norm(centers.double() - before.double(), dim=1)
    assert bool((actual <= movement).all())


def test_bounds_stay_exact_through_thousands_of_ulp_sized_updates():
    """A centre nudged towards a row by a few units in the last place for 22,000 updates (huge count,
    far from the row): the rounding of each update to float32 exceeds the step itself, and the
    bounds must count it (the reviewer's reproducer: the step's norm alone let a row keep a centre
    that was no longer its nearest)."""
    x = torch.tensor([[0.0]])
    centers = torch.tensor([[1.0], [1.0025]])
    bounds = Bounds(1, centers)
    screening = Screening(False)
    local = torch.tensor([0])
    assert bounds.labels(local, x, centers, screening).tolist() == [0]
    counts = torch.tensor([5.0, 2.0**20], dtype=torch.float64)
    sums = torch.zeros_like(centers)
    for _ in range(22_000):
        batch_counts = torch.tensor([0.0, 1.0], dtype=torch.float64)
        sums.zero_()
        sums[1] = centers[1] - 0.07
        movement = update_centres(centers, counts + batch_counts, sums, batch_counts, bound=True)
        assert movement is not None
        bounds.moved(movement)
        counts = counts + batch_counts
    brute = int(((x.double() - centers.double().T) ** 2).argmin())
    assert float(centers[1]) < float(centers[0])  # the second centre is now the nearer one
    assert bounds.labels(local, x, centers, screening).tolist() == [brute]


@pytest.mark.parametrize(("scale", "screen"), [(1e-19, True), (1e-21, False), (1e-30, True)])
def test_fits_on_tiny_features_assign_each_row_its_nearest_centre(scale, screen):
    """Below about 1e-19 GEMMs flush to zero: the bounds' absolute terms send such rows to float64."""
    rng = np.random.default_rng(0)
    x = ((rng.normal(size=(6, 12)) * 4)[rng.integers(0, 6, 2000)] + rng.normal(size=(2000, 12))) * scale
    x = x.astype(np.float32)
    kmeans = TorchKMeans(ClustererConfig(8, 3, 256, 0, options=TorchOptions(prune=True, screen=screen)))
    kmeans.fit(x)
    assert kmeans.centers is not None
    distance = ((torch.from_numpy(x).double()[:, None] - kmeans.centers.double()[None]) ** 2).sum(dim=2)
    assert np.array_equal(kmeans.predict(x), distance.argmin(dim=1).numpy())


def test_features_whose_squares_overflow_float32_are_refused_in_one_line():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 12)) * 2e19).astype(np.float32)
    with pytest.raises(SSLBenchError, match=r"overflow float32.*rescale"):
        TorchKMeans(ClustererConfig(4, 2, 128, 0)).fit(x)


def test_fits_read_arrays_of_any_layout():
    """Reversed (negative strides) and Fortran-ordered arrays fit as their C-ordered copies do."""
    rng = np.random.default_rng(0)
    x = ((rng.normal(size=(5, 8)) * 4)[rng.integers(0, 5, 600)] + rng.normal(size=(600, 8))).astype(np.float32)
    fits = []
    for array in (x[::-1], np.asfortranarray(x[::-1]), np.ascontiguousarray(x[::-1])):
        kmeans = TorchKMeans(ClustererConfig(5, 3, 128, 0))
        kmeans.fit(array)
        fits.append(kmeans.centers)
    assert all(torch.equal(centers, fits[-1]) for centers in fits)

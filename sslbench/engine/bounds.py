"""Yinyang bounds that let mini-batch k-means skip rows whose nearest centre provably stays the same."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sslbench.engine.device import torch_module
from sslbench.engine.gemm import FP32_UNIT, TINY
from sslbench.engine.nearest import Nearest, Screening, closest_centres

if TYPE_CHECKING:
    from torch import Tensor


def round_down(values: Tensor) -> Tensor:
    """float64 → float32, never above the float64 value (a lower bound stays one)."""
    torch = torch_module()
    low = values.float()
    above = low.double() > values
    return torch.where(above, torch.nextafter(low, torch.tensor(-torch.inf)), low)


def _centre_groups(centers: Tensor, n_groups: int) -> Tensor:
    """Group of every centre: a few Lloyd iterations over the centres themselves (Yinyang k-means), so
    that a group holds nearby centres and its lower bound stays tight."""
    torch = torch_module()
    seeds = centers[torch.linspace(0, len(centers) - 1, n_groups).round().long()].clone()
    groups = torch.zeros(len(centers), dtype=torch.int64)
    for _ in range(5):
        groups = closest_centres(centers, seeds, (seeds * seeds).sum(dim=1))[0]
        sums = torch.zeros_like(seeds).index_add_(0, groups, centers)
        sizes = torch.bincount(groups, minlength=n_groups).clamp_min(1)
        seeds = sums / sizes[:, None].to(sums.dtype)
    return groups


class Bounds:
    """Yinyang-style bounds for mini-batch k-means, per local sample, to skip provably unchanged rows.

    Centres are split into ``t`` groups of nearby centres. At a sample's last exact visit: ``upper`` =
    distance to its nearest centre and, per group, ``lower[g]`` = distance to the group's nearest centre
    other than that one. Since then its centre moved by at most ``drift[c] − drift_at`` (a sum of that
    centre's update movements) and every centre of group ``g`` by at most the group's summed largest
    movement per update (stored as ``lower[g] + group_drift[g]`` at the visit, so the current bound is
    that minus ``group_drift[g]`` now). By the
    triangle inequality the centre is still the nearest while ``upper + own drift < min over groups of
    the group bounds``; a relative margin covers the rounding of the bounds, which are proven bounds on
    exact distances (:class:`Nearest`), so the labels are those of the full computation (tests
    compare both). One far-moving centre (a starved one just re-seeded moves far on its next update)
    weakens only its group's bound, where a single bound over all centres (Hamerly's) would lose every row.

    Re-seeding moves tens of centres at once, each by about the distance between clusters: folded into
    the drifts, such a burst would weaken most groups and stop pruning for an epoch. So a burst is
    tracked instead (while the centres re-seeded since the oldest visit are few, ``TRACK_SHARE`` of k):
    it leaves the group drifts alone, and a row visited after it first *catches up*, taking bounds on its
    distances to every centre re-seeded since its last visit (their current positions) into its group
    bounds, and into its upper bound when its own centre was one of them.
    """

    MARGIN = 1e-3
    #: At most this many groups (memory: 4 bytes per sample and group).
    MAX_GROUPS = 64
    #: Re-seeding bursts are tracked while the centres re-seeded since the oldest visit are at most this
    #: share of the centres (a catch-up costs that share of a full product); beyond, jumps are folded.
    TRACK_SHARE = 0.25
    #: When bounds settle fewer than this share of a batch, all of it is computed: the few settled rows
    #: cost less in the product than gathering the others would, and their bounds come out fresh.
    WHOLE_BATCH = 0.9

    def __init__(self, n_local: int, centers: Tensor) -> None:
        torch = torch_module()
        k = len(centers)
        self.n_groups = max(1, min(self.MAX_GROUPS, k // 10))
        self.group = _centre_groups(centers, self.n_groups)
        self.label = torch.full((n_local,), -1, dtype=torch.int64)
        self.upper = torch.zeros(n_local, dtype=torch.float64)
        self.lower = torch.zeros((n_local, self.n_groups), dtype=torch.float32)
        self.drift_at = torch.zeros(n_local, dtype=torch.float64)
        self.sq = torch.zeros(n_local, dtype=torch.float32)
        self.drift = torch.zeros(k, dtype=torch.float64)
        self.group_drift = torch.zeros(self.n_groups, dtype=torch.float64)
        #: The centres of every tracked re-seeding burst, in order, and per sample how many of them it had
        #: caught up with at its last visit.
        self.bursts: list[Tensor] = []
        self.caught_up = torch.zeros(n_local, dtype=torch.int64)
        self.skipped = 0

    def labels(self, local: Tensor, x: Tensor, centers: Tensor, screening: Screening) -> Tensor:
        """Labels of the batch rows ``x`` (local sample numbers ``local``), computing only the rows
        whose bounds do not settle them."""
        torch = torch_module()
        label = self.label[local]
        seen = label >= 0
        own = label.clamp_min(0)
        upper = self.upper[local] + (self.drift[own] - self.drift_at[local])
        group_lower = self.lower[local].double() - self.group_drift
        # Squared norms are computed at a row's first visit and kept: a pass over the batch saved.
        x_sq = self.sq[local]
        unseen = torch.nonzero(~seen).flatten()
        if len(unseen) == len(local):
            x_sq = torch.linalg.vecdot(x, x)
            self.sq[local] = x_sq
        elif len(unseen):
            fresh = x[unseen]
            x_sq[unseen] = torch.linalg.vecdot(fresh, fresh)
            self.sq[local[unseen]] = x_sq[unseen]
        norms = x_sq.sqrt()
        behind = torch.nonzero(seen & (self.caught_up[local] < len(self.bursts))).flatten()
        if len(behind):
            self._catch_up(local, behind, x, x_sq, centers, own, upper, group_lower)
        lower = group_lower.min(dim=1).values
        settled = seen & (upper <= lower - self.MARGIN * (lower.abs() + norms.double()))
        todo = torch.nonzero(~settled).flatten()
        if len(todo) >= self.WHOLE_BATCH * len(local):
            todo = torch.arange(len(local))
        self.skipped += len(local) - len(todo)
        if len(todo):
            if len(todo) == len(local):  # no copy of the batch
                found, nearest, exact_lower = self._exact(x, centers, x_sq, norms, screening)
            else:
                found, nearest, exact_lower = self._exact(x[todo], centers, x_sq[todo], norms[todo], screening)
            rows = local[todo]
            label[todo] = found
            self.label[rows] = found
            self.upper[rows] = nearest
            self.lower[rows] = round_down(exact_lower + self.group_drift)
            self.drift_at[rows] = self.drift[found]
            self.caught_up[rows] = len(self.bursts)
        return label

    def _catch_up(
        self,
        local: Tensor,
        behind: Tensor,
        x: Tensor,
        x_sq: Tensor,
        centers: Tensor,
        own: Tensor,
        upper: Tensor,
        group_lower: Tensor,
    ) -> None:
        """Batch rows ``behind`` were last visited before some tracked re-seedings: bound their distances
        to every centre re-seeded since (where those centres are now), tighten ``upper`` (when it is the
        row's own centre) and ``group_lower`` (otherwise) in place, and store both as of now."""
        torch = torch_module()
        first = int(self.caught_up[local[behind]].min())
        reseeded = torch.cat(self.bursts[first:]).unique()
        chosen = centers[reseeded]
        rows, rows_sq = x[behind], x_sq[behind]
        nearest = Nearest(chosen, Screening(False))
        scores, _ = nearest.scores(rows)
        err = nearest.bounds(rows_sq.sqrt(), False)
        squared = scores.double() + rows_sq.double()[:, None]
        slack = err.double() + _norm_slack(rows_sq, x.shape[1])[:, None]
        far = (squared - slack).clamp_min_(0).sqrt_()
        near = (squared + slack).clamp_min_(0).sqrt_()
        is_own = reseeded[None, :] == own[behind][:, None]
        own_upper = torch.where(is_own, near, torch.inf).min(dim=1).values
        upper[behind] = torch.minimum(upper[behind], own_upper)
        reached = torch.full((len(behind), self.n_groups), torch.inf, dtype=torch.float64).scatter_reduce_(
            1, self.group[reseeded].expand(len(behind), -1), far.masked_fill_(is_own, torch.inf), "amin"
        )
        group_lower[behind] = torch.minimum(group_lower[behind], reached)
        stored = local[behind]
        self.upper[stored] = upper[behind]
        self.drift_at[stored] = self.drift[own[behind]]
        self.lower[stored] = round_down(group_lower[behind] + self.group_drift)
        self.caught_up[stored] = len(self.bursts)

    def _exact(
        self, x: Tensor, centers: Tensor, x_sq: Tensor, norms: Tensor, screening: Screening
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The exact nearest centre of every row (:class:`Nearest`), an upper bound on the distance to
        it, and per group a lower bound on the distance to the group's other centres (float64)."""
        torch = torch_module()
        nearest = Nearest(centers, screening)
        scores, screened = nearest.scores(x)
        found, err = nearest.labels(x, scores, norms, screened)
        at = found[:, None]
        best = scores.gather(1, at)[:, 0] + err
        reachable = scores.sub_(err[:, None]).scatter_(1, at, torch.inf)
        group_best = torch.full((len(x), self.n_groups), torch.inf).scatter_reduce_(
            1, self.group.expand(len(x), -1), reachable, "amin"
        )
        slack = _norm_slack(x_sq, x.shape[1])
        upper = (best.double() + x_sq.double() + slack).clamp_min_(0).sqrt_()
        group_lower = (group_best.double() + (x_sq.double() - slack)[:, None]).clamp_min_(0).sqrt_()
        return found, upper, group_lower

    def moved(self, movement: Tensor) -> None:
        """One update moved every centre by at most ``movement``."""
        torch = torch_module()
        movement = movement.double().cpu()
        self.drift += movement
        self.group_drift += torch.zeros(self.n_groups, dtype=torch.float64).scatter_reduce_(
            0, self.group, movement, "amax"
        )

    def reseed(self, jumps: Tensor) -> None:
        """Starved centres were re-seeded, each moving by ``jumps`` (0 for the others). The jumps enter
        the centres' own drifts; the burst is tracked (rows catch up with it at their next visit) while
        few centres are pending, else it is a movement like any other, entering its groups' drifts."""
        torch = torch_module()
        jumps = jumps.double().cpu()
        moved = torch.nonzero(jumps > 0).flatten()
        if not len(moved):
            return
        seen = self.label >= 0
        oldest = int(self.caught_up[seen].min()) if bool(seen.any()) else len(self.bursts)
        pending = torch.cat([*self.bursts[oldest:], moved]).unique()
        if len(pending) > self.TRACK_SHARE * len(self.drift):
            self.moved(jumps)
            return
        self.bursts.append(moved)
        self.drift += jumps


def _norm_slack(x_sq: Tensor, dims: int) -> Tensor:
    """Bound on the error of ``‖x‖²`` summed in float32 (float64), which a squared distance taken as
    score + ‖x‖² adds to the score's own bound."""
    return 1.01 * dims * FP32_UNIT * x_sq.double() + (dims + 1) * TINY

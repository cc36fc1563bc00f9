"""The linear probe (DINOv2's protocol) against scikit-learn's lbfgs on the same grid, its memory on a
memory-mapped ImageNet-size split, and its GPU time.

    python benchmarks/linear_probe.py                 # 100,000 × 768, 100 classes, the 45-value sweep + refit
    python benchmarks/linear_probe.py --sklearn-c 45  # scikit-learn on the whole grid too (hours on 2 cores)
    python benchmarks/linear_probe.py --memory        # memory-mapped 1,281,167 × 2048 train: peak RSS
    python benchmarks/linear_probe.py --gpu           # 1,281,167 × 1024, 1000 classes, on cuda
    python benchmarks/linear_probe.py --pass-times    # one evaluation: ours (3 kinds) and scikit-learn's
    python benchmarks/linear_probe.py --no-class-blocks  # ours whitened throughout (no per-class blocks)

Speed: Gaussian classes (``_synthetic.gaussian_classes``, ``--separation`` sets their overlap; or with
``--data blobs`` the ImageNet-like ``_synthetic.class_blobs``) split into train and eval;
:func:`sslbench.engine.logistic.linear_probe` runs the whole protocol (45 C values on the 90 % left after
DINOv2's held-out tenth, each from the previous solutions, then the refit at the chosen C on all of train
and the eval scores). scikit-learn's ``LogisticRegression(C, solver="lbfgs", tol=1e-12, max_iter=1000)``
— what the protocol costs without this engine, each C fitted from scratch as DINOv2 does — is timed on
``--sklearn-c`` C values spread over the grid (all 45 when asked): its total over the grid is
extrapolated by interpolating its seconds per C in log C (said so in the output), and its held-out
top-1 at those C values is compared with ours; then it refits at our chosen C on all of train, and its
eval top-1 is compared with ours.

Memory (``--memory``): writes (or reuses, with ``--workdir``/``--keep``) the memory-mapped train and
val .npy files of ``memory_pipeline.py`` and runs the probe on them in a child process whose peak RSS
``memory_pipeline.measure`` reports. Memory does not depend on the number of C values or iterations,
so ``--memory-c``/``--memory-iter`` keep the run short (defaults: 1 value, 2 iterations).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sslbench.threads import prefer_sleeping_threads  # noqa: E402

prefer_sleeping_threads()

import numpy as np  # noqa: E402
from _synthetic import class_blobs, gaussian_classes  # noqa: E402

from sslbench.engine.logistic import LogisticOptions, held_out_rows, linear_probe  # noqa: E402

GB = 1024**3


def sklearn_fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, tol: float):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, solver="lbfgs", tol=tol, max_iter=max_iter).fit(x, y)


def speed(args: argparse.Namespace) -> int:
    total = args.n + args.eval_n
    if args.data == "gaussian":
        x, y = gaussian_classes(total, args.classes, args.dims, args.separation, seed=args.seed)
        data = f"Gaussian classes, separation {args.separation}"
    else:
        x, y = class_blobs(total, args.classes, args.dims, seed=args.seed)
        data = "ImageNet-like class blobs: low-rank signal, decaying spectrum, ReLU'd"
    x_train, y_train, x_eval, y_eval = x[: args.n], y[: args.n], x[args.n :], y[args.n :]
    options = LogisticOptions(
        max_iter=args.max_iter,
        fast_products=not args.float64_products,
        precondition=not args.plain,
        predict_path=not args.plain,
        class_blocks=not (args.plain or args.no_class_blocks),
        memory=10 if args.plain else LogisticOptions().memory,
    )
    grid = sorted(options.c_values)
    print(
        f"train {args.n:,} × {args.dims}, eval {args.eval_n:,}, {args.classes} classes ({data}); "
        f"{len(grid)} C values, tol {options.tol:g}, max_iter {options.max_iter}; "
        f"ours with {'float32 then float64' if options.fast_products else 'float64'} products, "
        f"{'raw coordinates, warm starts' if args.plain else 'preconditioned, predicted starts'}"
        f"{'' if options.class_blocks else ', no class blocks'}, "
        f"L-BFGS memory {options.memory}; "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )

    def progress(point) -> None:
        print(
            f"  ours C={point.C:9.3g}: held-out top-1 {point.held_out_top1:.4f}, {point.iterations:4d} iterations"
            f"{'' if point.converged else ' (max_iter)'}",
            flush=True,
        )

    result = linear_probe(x_train, y_train, x_eval, y_eval, options, on_fit=progress)
    print(
        f"ours: {result.seconds:.1f} s for the sweep + refit; chosen C {result.C:.4g}, eval top-1 "
        f"{100 * result.top1:.2f} %, top-5 {100 * result.top5:.2f} %; refit {result.fit.iterations} iterations",
        flush=True,
    )
    for line in result.warnings:
        print("  warning:", line)
    print(f"ours: {sum(p.iterations for p in result.sweep)} sweep iterations", flush=True)
    if args.skip_sklearn:
        return 0

    held = held_out_rows(args.n, options.held_out_share, options.held_out_seed)
    fit_rows = np.setdiff1d(np.arange(args.n), held)
    x64 = x_train.astype(np.float64)
    picks = np.unique(np.round(np.linspace(0, len(grid) - 1, min(args.sklearn_c, len(grid)))).astype(int))
    seconds: dict[int, float] = {}
    ours = {p.C: p.held_out_top1 for p in result.sweep}
    for i in picks:
        C = grid[i]
        started = time.perf_counter()
        model = sklearn_fit(x64[fit_rows], y_train[fit_rows], C, options.max_iter, options.tol)
        seconds[i] = time.perf_counter() - started
        top1 = float(np.mean(model.predict(x64[held]) == y_train[held]))
        print(
            f"  scikit-learn C={C:9.3g}: {seconds[i]:7.1f} s, {int(model.n_iter_[0]):4d} iterations, held-out top-1 "
            f"{top1:.4f} (ours {ours[C]:.4f})",
            flush=True,
        )
    # Seconds per C interpolated in log C between the timed values (flat beyond the ends).
    logs = np.log10(np.asarray(grid))
    timed = sorted(seconds)
    estimate = np.interp(logs, logs[timed], [seconds[i] for i in timed])
    sweep_total = float(estimate.sum())
    started = time.perf_counter()
    refit = sklearn_fit(x64, y_train, result.C, options.max_iter, options.tol)
    refit_s = time.perf_counter() - started
    sk_top1 = float(np.mean(refit.predict(x_eval.astype(np.float64)) == y_eval))
    total = sweep_total + refit_s
    measured = "measured" if len(timed) == len(grid) else f"extrapolated from {len(timed)} of {len(grid)} C values"
    print(
        f"scikit-learn: sweep {sweep_total:.0f} s ({measured}) + refit at C={result.C:.4g} {refit_s:.1f} s; "
        f"eval top-1 {100 * sk_top1:.2f} % (ours {100 * result.top1:.2f} %, difference "
        f"{100 * abs(sk_top1 - result.top1):.2f} point)"
    )
    ratio = total / result.seconds
    print(f"speed-up {ratio:.1f}× (goal ≥ 10×: {'met' if ratio >= 10 else 'MISSED'})")
    if len(timed) == len(grid):
        print("same chosen C:", grid[int(np.argmax([ours[c] for c in grid]))] == result.C)
    return 0


def pass_times(args: argparse.Namespace) -> int:
    """Seconds of one evaluation (objective and gradient over ``--n`` rows) at the given size: ours
    with float32 products (plain and anchored) and with float64 products, and scikit-learn's (its
    private ``LinearModelLoss``, what its lbfgs solver calls once per evaluation), each the best of
    ``--repeats`` after a warm-up."""
    import torch
    from sklearn._loss.loss import HalfMultinomialLoss
    from sklearn.linear_model._linear_loss import LinearModelLoss

    from sslbench.arrays import RowReader
    from sslbench.engine.logistic import _Problem
    from sslbench.engine.rows import DeviceRows
    from sslbench.threads import torch_threads

    x, y = gaussian_classes(args.n, args.classes, args.dims, args.separation, seed=args.seed)
    problem = _Problem(DeviceRows(RowReader(x), "cpu"), y, args.classes, LogisticOptions().chunk_rows, "cpu")
    rng = np.random.default_rng(0)
    theta = torch.from_numpy(rng.normal(scale=0.01, size=args.classes * (args.dims + 1)))
    weights = torch.ones(args.n, dtype=torch.float64)

    def best(run) -> float:
        run()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    with torch_threads(problem.chunk_work):
        fast = best(lambda: problem.evaluate(theta, weights, 1.0, exact=False))
        exact = best(lambda: problem.evaluate(theta, weights, 1.0, exact=True))
        anchor = problem.anchor_at(theta)
        anchored = math.nan
        if anchor is not None:
            problem.evaluate(theta, weights, 1.0, exact=True, record=anchor)
            near = theta + 1e-4
            anchored = best(lambda: problem.evaluate(near, weights, 1.0, exact=False, anchor=anchor))
    loss = LinearModelLoss(base_loss=HalfMultinomialLoss(n_classes=args.classes), fit_intercept=True)
    x64, y64, ones = x.astype(np.float64), y.astype(np.float64), np.ones(args.n)
    coef = theta.numpy().copy()
    threads = os.cpu_count() or 1
    reference = best(lambda: loss.loss_gradient(coef, x64, y64, ones, l2_reg_strength=1.0 / args.n, n_threads=threads))
    print(
        f"one evaluation, {args.n:,} × {args.dims}, {args.classes} classes (best of {args.repeats}): "
        f"scikit-learn {reference:.3f} s; ours float32 {fast:.3f} s ({reference / fast:.2f}×), "
        f"anchored float32 {anchored:.3f} s ({reference / anchored:.2f}×), "
        f"float64 {exact:.3f} s ({reference / exact:.2f}×)"
    )
    return 0


def memory_child(args: argparse.Namespace) -> int:
    """The probe on the memory-mapped files (run in the measured child)."""
    train, train_labels, val, val_labels = (np.load(path, mmap_mode="r") for path in args.memory_child)
    grid = tuple(10.0**t for t in np.linspace(-3, 0, args.memory_c)) if args.memory_c > 1 else (1e-2,)
    options = LogisticOptions(c_values=grid, max_iter=args.memory_iter)
    result = linear_probe(train, train_labels, val, val_labels, options)
    print(f"probe done in {result.seconds:.0f} s: eval top-1 {100 * result.top1:.2f} %", file=sys.stderr)
    return 0


def memory(args: argparse.Namespace) -> int:
    import memory_pipeline as mp

    workload = mp.Workload(args.memory_rows, 50_000, args.memory_dims, args.memory_classes, 1, args.seed)
    base = args.workdir if args.workdir is not None else mp.roomiest_dir()
    base.mkdir(parents=True, exist_ok=True)
    workdir = base if args.workdir is not None else Path(tempfile.mkdtemp(prefix="sslbench-linear-", dir=base))
    files, reused = mp.ensure_data(workload, workdir)
    print(
        f"train {args.memory_rows:,} × {args.memory_dims} float32 memory-mapped ({'reused' if reused else 'written'})"
    )
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        *(str(path) for pair in files.values() for path in pair),
        "--memory-c",
        str(args.memory_c),
        "--memory-iter",
        str(args.memory_iter),
    ]
    print(
        f"probing: {args.memory_classes} classes, {args.memory_c} C value(s), at most {args.memory_iter} "
        "iterations each (memory does not depend on either)",
        flush=True,
    )
    m = mp.measure(command, HERE.parent, mp.child_env(workdir), workdir)
    line, met = mp.report(m, 3.0)
    print(line)
    if not args.keep and args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if met and m.returncode == 0 else 1


def gpu(args: argparse.Namespace) -> int:
    x, y = gaussian_classes(1_281_167 + 50_000, 1000, 1024, args.separation, seed=args.seed)
    options = LogisticOptions(max_iter=args.max_iter)
    result = linear_probe(x[:1_281_167], y[:1_281_167], x[1_281_167:], y[1_281_167:], options, device="cuda")
    iterations = sum(p.iterations for p in result.sweep)
    print(
        f"GPU: 1,281,167 × 1024, 1000 classes: {len(result.sweep)} C values + refit in {result.seconds:.0f} s "
        f"({iterations} sweep iterations); chosen C {result.C:.4g}, eval top-1 {100 * result.top1:.2f} % "
        f"(goal ≤ 300 s: {'met' if result.seconds <= 300 else 'MISSED'})"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="train rows")
    parser.add_argument("--eval-n", type=int, default=10_000, help="eval rows")
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument(
        "--data", choices=("gaussian", "blobs"), default="gaussian", help="the features' distribution (_synthetic.py)"
    )
    parser.add_argument("--separation", type=float, default=3.5, help="norm of the class means (noise: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per C, both solvers")
    parser.add_argument(
        "--float64-products", action="store_true", help="ours without the float32 phase (fast_products off)"
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="ours without whitening, predicted starts and the larger memory (raw coordinates, L-BFGS memory 10, "
        "each C from the last solution); still its own L-BFGS and anchored passes",
    )
    parser.add_argument("--no-class-blocks", action="store_true", help="ours whitened throughout (class_blocks off)")
    parser.add_argument("--skip-sklearn", action="store_true", help="time ours only")
    parser.add_argument("--sklearn-c", type=int, default=5, help="C values scikit-learn is timed on (45: all)")
    parser.add_argument("--memory", action="store_true", help="peak RSS on a memory-mapped ImageNet-size split")
    parser.add_argument("--memory-rows", type=int, default=1_281_167)
    parser.add_argument("--memory-dims", type=int, default=2048)
    parser.add_argument("--memory-classes", type=int, default=100)
    parser.add_argument("--memory-c", type=int, default=1, help="C values of the memory run")
    parser.add_argument("--memory-iter", type=int, default=2, help="iterations per C of the memory run")
    parser.add_argument("--memory-child", type=Path, nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help="folder for the memory run's files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the memory run's files")
    parser.add_argument("--gpu", action="store_true", help="1.28M × 1024, 1000 classes on cuda")
    parser.add_argument(
        "--pass-times",
        action="store_true",
        help="one evaluation's seconds, ours (float32, anchored, float64) and scikit-learn's",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations per side (--pass-times)")
    args = parser.parse_args()
    if args.memory_child is not None:
        return memory_child(args)
    if args.memory:
        return memory(args)
    if args.gpu:
        return gpu(args)
    if args.pass_times:
        return pass_times(args)
    if not math.isfinite(args.separation) or args.separation < 0:
        parser.error("--separation must be a non-negative number")
    return speed(args)


if __name__ == "__main__":
    sys.exit(main())

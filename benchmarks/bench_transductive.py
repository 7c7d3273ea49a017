"""Cost of ``pseudolabel --method transductive``'s fit: label spreading against the EM it feeds.

On random features (N images, D dims, C classes, 16 labels per class), times
``transductive_posterior`` with ``pseudolabel``'s defaults (the neighbour term without labels only):
the EM alone (no labels, no neighbour term), without labels (the neighbour term: the k-NN graph and
one sparse product per round in the second half), with labels but no spreading (``spread=False``),
and with the default spreading (the spread labels for naming and the
held-out folds for the local evidence); and the graph and the spreading alone (``knn_graph``,
``spread_labels``). The cases run interleaved ``--repeats`` times and the best of each is kept; ratios
are to the EM alone of the same run, so load on a shared machine affects them alike.

    python benchmarks/bench_transductive.py                       # 20,000 x 512, 10 and 100 classes
    python benchmarks/bench_transductive.py --rows 5000 --classes 10 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import scipy.optimize  # noqa: F401  (the naming's import, not timed)
import torch

from promptcli.noise.label_posterior import centred_directions
from promptcli.noise.transductive import knn_graph, spread_labels, transductive_posterior

HERE = Path(__file__).resolve().parent


def _problem(rows: int, dims: int, classes: int, shots: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=gen)
    truth = torch.randint(classes, (rows,), generator=gen)
    features = centres[truth] + 2.0 * torch.randn(rows, dims, generator=gen)
    prior = torch.log_softmax(torch.randn(rows, classes, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.full((rows,), -1)
    for c in range(classes):
        members = torch.nonzero(truth == c).squeeze(1)[:shots]
        labels[members] = torch.randint(classes, (len(members),), generator=gen)  # all noise: timing only
    return features, prior, labels


def _cases(features: torch.Tensor, prior: torch.Tensor, labels: torch.Tensor, classes: int) -> dict:
    directions = centred_directions(features)
    return {
        "EM alone (no labels, no neighbour term)": lambda: transductive_posterior(
            features, prior, centroid_scale=25.0, neighbour_scale=0.0
        ),
        "fit, no labels": lambda: transductive_posterior(
            features, prior, centroid_scale=25.0, neighbour_scale=10.0
        ),
        "fit, labels, no spreading": lambda: transductive_posterior(
            features, prior, centroid_scale=25.0, neighbour_scale=0.0, labels=labels, spread=False
        ),
        "fit, labels (default)": lambda: transductive_posterior(
            features, prior, centroid_scale=25.0, neighbour_scale=0.0, labels=labels
        ),
        "k-NN graph alone": lambda: knn_graph(directions, 10),
        "spread_labels alone (graph + folds)": lambda: spread_labels(directions, labels, classes),
    }


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "transductive.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for classes in args.classes:
        features, prior, labels = _problem(args.rows, args.dims, classes, args.shots)
        cases = _cases(features, prior, labels, classes)
        best = {name: float("inf") for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                best[name] = min(best[name], _time(fn))
        base = best["EM alone (no labels, no neighbour term)"]
        print(f"\n{args.rows:,} x {args.dims}, {classes} classes, {int((labels >= 0).sum())} labels")
        for name, seconds in best.items():
            print(f"  {name:40s} {seconds:8.2f} s   x{seconds / base:5.1f}")
            results.append(
                {
                    "classes": classes,
                    "case": name,
                    "seconds": seconds,
                    "ratio_to_em_alone": seconds / base,
                }
            )

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "rows": args.rows,
                "dims": args.dims,
                "shots": args.shots,
                "repeats": args.repeats,
                "threads": args.threads,
                "cpu_count": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

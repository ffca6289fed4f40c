"""The logreg protocol: the fast linear probe for small data.

Representations extracted once (evaluation transform), each feature standardised with the train
mean and std, scikit-learn's multinomial logistic regression with C (inverse L2 strength)
chosen from :data:`C_GRID` on a stratified held-out 10% of the train split, then refit on all of
it. scikit-learn runs on the host: with several processes each computes the same fit from the
same gathered features (deterministic), which costs seconds next to the extraction.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from bt_jax.evaluate.context import Backbone, Context, labelled, register, topk_accuracy

C_GRID = (0.01, 0.1, 1.0)
VALIDATION_FRACTION = 0.1
SMALL_PROBLEM_SIZE = 2**24  # train matrices with fewer entries are fitted single-threaded


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    # On small problems lbfgs is a long series of small BLAS calls, where thread hand-offs cost
    # more than they save (15x slower with two threads on a busy 2-core machine): one thread.
    threads = 1 if x.size < SMALL_PROBLEM_SIZE else None
    with warnings.catch_warnings(), threadpool_limits(threads, user_api="blas"):
        # lbfgs stopping at max_iter is normal on near-separable data: accuracy has converged.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=1000).fit(x, y)


def _choose_c(x: np.ndarray, y: np.ndarray, c_grid: Sequence[float], seed: int) -> float:
    """The C of c_grid with the best accuracy on a stratified held-out part of the train set."""
    from sklearn.model_selection import train_test_split

    if len(c_grid) == 1:
        return float(c_grid[0])
    try:
        x_fit, x_val, y_fit, y_val = train_test_split(
            x, y, test_size=VALIDATION_FRACTION, stratify=y, random_state=seed
        )
    except ValueError:  # a class with a single example cannot be stratified
        return 1.0
    scores = [_fit(x_fit, y_fit, c).score(x_val, y_val) for c in c_grid]
    return float(c_grid[int(np.argmax(scores))])


def logreg_protocol(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int | None = None,
    c_grid: Sequence[float] = C_GRID,
    seed: int = 0,
) -> dict:
    """{"top1", "top5", "C"}: multinomial logistic regression on standardised features.

    train_x [N, F], test_x [M, F] (representations or pixels); labels int (-1 left out).
    """
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = labelled(train_x, train_y)
    test_x, test_y = labelled(test_x, test_y)
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    c = _choose_c(train_x, train_y, c_grid, seed)
    model = _fit(train_x, train_y, c)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    scores = np.full((len(test_x), num_classes), -np.inf)
    scores[:, model.classes_] = model.predict_proba(test_x)
    return {**topk_accuracy(scores, test_y), "C": c}


@register("logreg")
def logreg(context: Context, backbone: Backbone) -> dict:
    return logreg_protocol(
        *context.representations(backbone, "train"),
        *context.representations(backbone, "test"),
        num_classes=context.num_classes,
        seed=context.config.seed,
    )

"""The scale of the Barlow Twins loss: what to expect at the start, and the floor at the end.

    python experiments/loss_scale.py                               # D=8192, the paper's lambd
    python experiments/loss_scale.py --dim 1024 --batches 256 --measure

chance_terms: for embeddings whose dimensions are independent (a fair model of a network at
initialisation), E[invariance] = D N/(N-1) and E[redundancy] = D (D-1)/(N-1). minimum_loss: the
least loss N examples allow, however good the representation, since the rank of C is at most
N-1. --measure also evaluates the terms on one draw of independent Gaussian embeddings (eps=0)
beside the expectation. The derivations are in bt_jax/loss.py's module docstring.
"""

from __future__ import annotations

import argparse

import jax

from bt_jax import loss as loss_lib


def chance_terms(global_batch: int, embedding_dim: int) -> loss_lib.BarlowTwinsTerms:
    """E[terms] for two views whose D dimensions are independent (eps=0), as Python floats.

    E[C_ij^2] = 1/(N-1) for independent standardised columns of N exchangeable values, so
    E[invariance] = D (1 + 1/(N-1)) and E[redundancy] = D (D-1) / (N-1).
    """
    n, d = global_batch, embedding_dim
    return loss_lib.BarlowTwinsTerms(
        invariance=d * (1 + 1 / (n - 1)), redundancy=d * (d - 1) / (n - 1)
    )


def minimum_loss(
    global_batch: int, embedding_dim: int, lambd: float = loss_lib.DEFAULT_LAMBD
) -> float:
    """The least loss N examples allow: D k / (1 + k), k = lambd max(0, D/(N-1) - 1).

    Centred over N examples, C has rank r <= N-1, so sum_ij C_ij^2 >= (tr C)^2 / r (singular
    values, Cauchy-Schwarz); for lambd <= 1 the loss under that constraint is least with every
    C_ii at 1/(1+k), which identical views of a tight frame reach (eps shrinking C).
    """
    if not 0 <= lambd <= 1:
        raise ValueError(f"minimum_loss holds for 0 <= lambd <= 1; got {lambd}.")
    k = lambd * max(0.0, embedding_dim / (global_batch - 1) - 1)
    return embedding_dim * k / (1 + k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=8192, help="embedding dimension D")
    parser.add_argument(
        "--batches", default="256,512,1024,2048,4096", help="comma-separated global batch sizes N"
    )
    parser.add_argument("--lambd", type=float, default=loss_lib.DEFAULT_LAMBD)
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also measure the terms on one draw of Gaussian embeddings",
    )
    args = parser.parse_args()
    header = ["N", "D", "E[invariance]", "E[redundancy]", "E[loss]", "minimum loss"]
    if args.measure:
        header += ["measured invariance", "measured redundancy", "measured loss"]
    print(f"# lambd = {args.lambd}; expectations for independent dimensions (eps=0)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for global_batch in (int(n) for n in args.batches.split(",")):
        chance = chance_terms(global_batch, args.dim)
        cells = [
            global_batch,
            args.dim,
            f"{chance.invariance:.1f}",
            f"{chance.redundancy:.1f}",
            f"{chance.invariance + args.lambd * chance.redundancy:.1f}",
            f"{minimum_loss(global_batch, args.dim, args.lambd):.1f}",
        ]
        if args.measure:
            z_a, z_b = jax.random.normal(jax.random.key(global_batch), (2, global_batch, args.dim))
            terms = loss_lib.barlow_twins_terms(z_a, z_b, eps=0.0)
            cells += [
                f"{float(terms.invariance):.1f}",
                f"{float(terms.redundancy):.1f}",
                f"{float(terms.invariance + args.lambd * terms.redundancy):.1f}",
            ]
        print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Save a grid of original / view A / view B triples: what pretraining will see, before training.

    python -m bt_jax.data.preview --dataset digits --out views.png
    python -m bt_jax.data.preview --dataset folder --data_dir ~/photos --image_size 224

The views are exactly those of epoch --epoch of training with --seed (same per-example seeds as
`pretrain_batches` with photometric="host"), for the first --num examples of the pretraining
split. Errors are one `error:` line (--verbose for the traceback).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

import numpy as np
from etils import epath

from bt_jax.data import views
from bt_jax.data.errors import DataError


def preview_triples(
    source,
    *,
    num: int,
    image_size: int,
    seed: int = 0,
    epoch: int = 0,
    min_crop_scale: float = 0.08,
) -> np.ndarray:
    """uint8 [num, 3, image_size, image_size, 3]: (original, view A, view B) per example."""
    from bt_jax.data import augment
    from bt_jax.data.tf_runtime import tf

    split = source.split("pretrain")
    num = min(num, split.num_examples)
    images, _ = split.fetch(np.arange(num))
    rows = []
    for i in range(num):
        image = tf.constant(images[i])
        original = augment.eval_transform(image, image_size=image_size)
        two = augment.augment_views(
            image,
            [augment.view_seed(seed, epoch, i, v) for v in ("a", "b")],
            ["a", "b"],
            image_size=image_size,
            min_crop_scale=min_crop_scale,
        )
        rows.append(np.stack([original.numpy()] + [v.numpy() for v in two]))
    return np.stack(rows)


def save_grid(triples: np.ndarray, path: epath.PathLike, title: str = "") -> None:
    """Writes uint8 triples [N, 3, H, W, 3] as an N-row, 3-column PNG picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(triples)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for r in range(n):
        for c, name in enumerate(("original", "view A", "view B")):
            ax = axes[r, c]
            ax.imshow(triples[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    epath.Path(path).write_bytes(buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="digits, idx, folder or a tfds name")
    parser.add_argument(
        "--data_dir",
        "--data-dir",
        default=None,
        help="IDX folder, image folder or tfds data_dir (local or gs://)",
    )
    parser.add_argument("--out", default="views.png", help="output picture (PNG)")
    parser.add_argument("--num", type=int, default=8, help="examples (rows)")
    parser.add_argument("--image_size", "--image-size", type=int, default=32)
    parser.add_argument("--min_crop_scale", "--min-crop-scale", type=float, default=0.08)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="tracebacks for bug reports")
    args = parser.parse_args(argv)
    if args.num <= 0:
        raise DataError(f"--num must be positive, got {args.num}")

    views.check_image_args(args.image_size, args.min_crop_scale)
    from bt_jax.data.catalog import load_source

    source = load_source(args.dataset, args.data_dir)
    triples = preview_triples(
        source,
        num=args.num,
        image_size=args.image_size,
        seed=args.seed,
        epoch=args.epoch,
        min_crop_scale=args.min_crop_scale,
    )
    save_grid(triples, args.out, f"{args.dataset}: seed {args.seed}, epoch {args.epoch}")
    print(f"wrote {args.out}: {len(triples)} x (original, view A, view B) at {args.image_size} px")
    return 0


if __name__ == "__main__":
    from bt_jax import cli

    cli.skip_keras()
    cli.run(lambda: main(sys.argv[1:]))

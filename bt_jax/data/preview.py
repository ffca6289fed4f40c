"""Save a grid of original / view A / view B triples: what pretraining will see, before spending compute.

    python -m bt_jax.data.preview --dataset digits --out views.png
    python -m bt_jax.data.preview --dataset folder --data_dir ~/photos --image_size 224 --out views.png

The views are exactly those of epoch --epoch of training with --seed (same per-example seeds as
`pretrain_batches`), for the first --num examples of the pretraining split.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np


def preview_triples(source, *, num: int, image_size: int, seed: int = 0, epoch: int = 0,
                    min_crop_scale: float = 0.08) -> np.ndarray:
    """float32 [num, 3, image_size, image_size, 3] in [0, 1]: (original, view A, view B) per example."""
    import tensorflow as tf

    from bt_jax.data import augment

    split = source.split("pretrain")
    num = min(num, split.num_examples)
    images, _ = split.reader()(tf.range(num, dtype=tf.int64))
    rows = []
    for i in range(num):
        original = augment.eval_transform(images[i], image_size=image_size, normalise=False)
        views = [augment.augment_view(images[i], augment.view_seed(seed, epoch, i, v), view=v,
                                      image_size=image_size, min_crop_scale=min_crop_scale,
                                      normalise=False) for v in ("a", "b")]
        rows.append(np.stack([original.numpy()] + [v.numpy() for v in views]))
    return np.stack(rows)


def save_grid(triples: np.ndarray, path: str, title: str = "") -> None:
    """Writes triples [N, 3, H, W, 3] as an N-row, 3-column picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(triples)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for r in range(n):
        for c, name in enumerate(("original", "view A", "view B")):
            ax = axes[r, c]
            ax.imshow(np.clip(triples[r, c], 0.0, 1.0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="digits, idx, folder or a tfds name")
    parser.add_argument("--data_dir", "--data-dir", default=None,
                        help="IDX folder, image folder or tfds data_dir")
    parser.add_argument("--out", default="views.png", help="output picture (PNG)")
    parser.add_argument("--num", type=int, default=8, help="examples (rows)")
    parser.add_argument("--image_size", "--image-size", type=int, default=32)
    parser.add_argument("--min_crop_scale", "--min-crop-scale", type=float, default=0.08)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch", type=int, default=0)
    args = parser.parse_args(argv)

    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from bt_jax.data.sources import load_source

    source = load_source(args.dataset, args.data_dir)
    triples = preview_triples(source, num=args.num, image_size=args.image_size, seed=args.seed,
                              epoch=args.epoch, min_crop_scale=args.min_crop_scale)
    save_grid(triples, args.out, f"{args.dataset}: seed {args.seed}, epoch {args.epoch}")
    print(f"wrote {args.out}: {len(triples)} x (original, view A, view B) at {args.image_size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Input pipeline throughput: two-view examples per second per CPU core, 32 px and 224 px.

    python experiments/benchmarks/input.py            # one tf.data worker thread = one core
    python experiments/benchmarks/input.py --workers 1 2

Images are real photographs (scikit-learn's two bundled sample JPEGs, 427 x 640), cut into
crops and written as JPEG files to a temporary folder, read through the 'folder' source, so the
numbers include JPEG decoding (decode_and_crop_jpeg) as in ImageNet training:
- 32 px: 32 x 32 JPEGs (CIFAR-like), and the same pixels held decoded in memory (as cifar10
  through tfds is held);
- 224 px: 500 x 375 JPEGs (ImageNet's typical size).
One "pair" is one example with both views (crop, flip, jitter, grayscale, blur, solarize,
normalise, each view). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

from bt_jax import data  # noqa: E402


def photo_crops(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [num, height, width, 3]: random crops (rescaled) of the sample photographs."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((num, height, width, 3), np.uint8)
    for i in range(num):
        photo = photos[i % len(photos)]
        ch = int(rng.integers(photo.shape[0] // 3, photo.shape[0]))
        cw = min(photo.shape[1], int(ch * width / height))
        top = int(rng.integers(0, photo.shape[0] - ch + 1))
        left = int(rng.integers(0, photo.shape[1] - cw + 1))
        crop = tf.image.resize(photo[top:top + ch, left:left + cw], [height, width],
                               method="area", antialias=True)
        out[i] = np.clip(np.round(crop.numpy()), 0, 255).astype(np.uint8)
    return out


def write_jpegs(images: np.ndarray, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        tf.io.write_file(os.path.join(folder, f"{i:05d}.jpg"), tf.io.encode_jpeg(image, quality=90))


def pairs_per_second(source, *, image_size: int, batch: int, workers: int, steps: int) -> float:
    it = data.pretrain_batches(source, global_batch=batch, image_size=image_size, seed=0,
                               process_index=0, process_count=1, local_device_count=1,
                               num_workers=workers)
    for _ in range(3):  # tracing, thread start-up, first permutation
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="tf.data threads to measure with (1 = per core)")
    parser.add_argument("--seconds", type=float, default=10.0, help="rough time per row")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        small = photo_crops(512, 32, 32)
        write_jpegs(small, os.path.join(tmp, "jpeg32"))
        write_jpegs(photo_crops(128, 375, 500, seed=1), os.path.join(tmp, "jpeg224"))
        rows = [
            ("32 x 32 JPEG files", 32, data.load_source("folder", os.path.join(tmp, "jpeg32")), 128),
            ("32 x 32 uint8 in memory", 32,
             data.from_arrays("mem32", small, None, small[:1], None), 128),
            ("500 x 375 JPEG files", 224, data.load_source("folder", os.path.join(tmp, "jpeg224")), 32),
        ]
        print(f"CPU: {os.cpu_count()} cores visible; TF {tf.__version__}\n")
        print("| input | output | tf.data threads | two-view pairs/s | pairs/s per core |")
        print("| --- | --- | --- | --- | --- |")
        for name, size, source, batch in rows:
            for workers in args.workers:
                # Size the run to about --seconds from a short probe.
                probe = pairs_per_second(source, image_size=size, batch=batch, workers=workers, steps=2)
                steps = max(3, int(args.seconds * probe / batch))
                rate = pairs_per_second(source, image_size=size, batch=batch, workers=workers,
                                        steps=steps)
                print(f"| {name} | {size} px | {workers} | {rate:,.0f} | {rate / workers:,.0f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

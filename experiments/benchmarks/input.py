"""Input pipeline throughput: two-view pairs per second on one CPU core, side by side.

    python experiments/benchmarks/input.py                           # bt_jax only
    /work/bench-venv/bin/python experiments/benchmarks/input.py --against-torchvision
    python experiments/benchmarks/input.py --baseline /tmp/before    # another bt_jax checkout too

Every case runs pinned to the same core (os.sched_setaffinity; tf.data with one thread,
torch with torch.set_num_threads(1) and one DataLoader worker process on that core), and the
cases alternate: each round measures every case once, for about --seconds, and the table gives
the median over --repeats rounds (with the range), so a machine shared with other jobs slows
all of them alike. One "pair" is one example with both views, as the trainer consumes it.

Cases:
- bt_jax, photometric="host": the whole recipe on the host (decode, crop, flip, resize, colour
  jitter, grayscale, blur, solarize), uint8 out;
- bt_jax, photometric="device": the host part only (decode, crop, flip, resize), uint8 out;
  the rest runs in the train step (bt_jax.data.photometric);
- torchvision: the official recipe as the official main.py's Transform (PIL decode through
  ImageFolder, RandomResizedCrop bicubic, flip, ColorJitter p 0.8, grayscale p 0.2, PIL
  GaussianBlur p 1.0 / 0.1, solarize p 0 / 0.2, ToTensor, Normalize), float32 out;
- --baseline DIR: bt_jax from another checkout (its pretrain_batches, host photometric), run in
  a subprocess on the same core.
Images: 128 crops of 500 x 375 (ImageNet's typical size) of scikit-learn's two sample photos,
JPEG quality 90, at 224 px; 512 crops of 32 x 32 as JPEG files and held decoded in memory, at
32 px (CIFAR-like). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def pin_to_core(core: int) -> None:
    """Every thread of this process (and what it starts later) on one core."""
    os.sched_setaffinity(0, {core})
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), {core})
        except OSError:  # a thread that has just ended
            pass


def photo_crops(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [num, height, width, 3]: crops of the sample photographs, deterministic in seed.

    Crops of the photos' size or larger are cut at random positions (and mirrored at random);
    smaller sizes are random crops box-filtered down to (height, width).
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 photographs
    rng = np.random.default_rng(seed)
    out = np.empty((num, height, width, 3), np.uint8)
    for i in range(num):
        photo = photos[i % len(photos)]
        if height * 2 > photo.shape[0]:  # large: a crop at full resolution
            top = int(rng.integers(0, photo.shape[0] - height + 1))
            left = int(rng.integers(0, photo.shape[1] - width + 1))
            crop = photo[top : top + height, left : left + width]
        else:
            ch = int(rng.integers(photo.shape[0] // 3, photo.shape[0]))
            cw = min(photo.shape[1], int(ch * width / height))
            top = int(rng.integers(0, photo.shape[0] - ch + 1))
            left = int(rng.integers(0, photo.shape[1] - cw + 1))
            crop = np.asarray(
                Image.fromarray(photo[top : top + ch, left : left + cw]).resize(
                    (width, height), Image.BOX
                )
            )
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def write_jpegs(images: np.ndarray, folder: str) -> None:
    """One JPEG (quality 90) per image, in folder/images/ (ImageFolder needs a class folder)."""
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, "images", f"{i:05d}.jpg"), quality=90)


# --------------------------------------------------------------------------- the cases


def bt_jax_batches(source, image_size: int, batch: int, photometric: str):
    from bt_jax import data

    return data.pretrain_batches(
        source,
        global_batch=batch,
        image_size=image_size,
        seed=0,
        photometric=photometric,
        process_index=0,
        process_count=1,
        num_workers=1,
    )


def torchvision_batches(folder: str, image_size: int, batch: int):
    """The official main.py's Transform through ImageFolder and a one-worker DataLoader."""
    import random

    import torch
    import torchvision
    from PIL import ImageFilter, ImageOps
    from torchvision import transforms

    class GaussianBlur:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            if random.random() < self.p:
                return img.filter(ImageFilter.GaussianBlur(random.random() * 1.9 + 0.1))
            return img

    class Solarization:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            return ImageOps.solarize(img) if random.random() < self.p else img

    def view(blur, solarize):
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    image_size, interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
                GaussianBlur(p=blur),
                Solarization(p=solarize),
                transforms.ToTensor(),
                transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        )

    class Transform:
        def __init__(self):
            self.transform, self.transform_prime = view(1.0, 0.0), view(0.1, 0.2)

        def __call__(self, x):
            return self.transform(x), self.transform_prime(x)

    dataset = torchvision.datasets.ImageFolder(folder, Transform())
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=10**8)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=1, sampler=sampler)
    return iter(loader)


_BASELINE_SNIPPET = r"""
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
folder, size, batch, seconds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
from bt_jax import data
source = data.load_source("folder", folder)
try:
    it = data.pretrain_batches(source, global_batch=batch, image_size=size, seed=0,
                               process_index=0, process_count=1, num_workers=1)
    next(it)
except TypeError:  # the pipeline with a device axis
    it = data.pretrain_batches(source, global_batch=batch, image_size=size, seed=0,
                               process_index=0, process_count=1, local_device_count=1,
                               num_workers=1)
for _ in range(2):
    next(it)
start, pairs = time.perf_counter(), 0
while time.perf_counter() - start < seconds:
    next(it)
    pairs += batch
print(pairs / (time.perf_counter() - start), flush=True)
os._exit(0)  # older pipelines could hang at interpreter exit (tf.data threads in a numpy hop)
"""


def baseline_rate(
    checkout: str, core: int, folder: str, image_size: int, batch: int, seconds: float
) -> float:
    env = dict(os.environ, PYTHONPATH=checkout, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _BASELINE_SNIPPET,
            str(core),
            folder,
            str(image_size),
            str(batch),
            str(seconds),
        ],
        env=env,
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(out.stdout.strip().splitlines()[-1])


def decode_only_batches(source, batch: int):
    """The host pipeline's read and JPEG decode (union of two crop windows) and nothing else."""
    from bt_jax.data import augment
    from bt_jax.data.tf_runtime import tf

    images = source.split("pretrain").images

    def decode(i):
        seeds = [augment.view_seed(0, 0, i, v) for v in ("a", "b")]
        pixels, _ = augment._decode_windows(
            tf.gather(tf.constant(images), i % len(images)),
            lambda h, w: [
                augment.random_resized_crop_window(augment._Draws(s).crop, h, w) for s in seeds
            ],
        )
        return tf.reduce_sum(tf.cast(pixels[:1, :1], tf.int32))  # keep the decode, drop pixels

    ds = tf.data.Dataset.counter().map(decode, num_parallel_calls=1).batch(batch)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return ds.prefetch(2).with_options(options).as_numpy_iterator()


def profile_cases(source) -> list:
    """(stage, make iterator): the host pipeline at 224 px with one operation added at a time,
    every added operation forced on (probability 1) in both views."""
    from bt_jax import data

    off = data.ViewSpec(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    stages = [
        ("read + JPEG decode (union of both crop windows)", None),
        ("+ crop, resize, flip, uint8: photometric=device", "device"),
    ]
    for name, change in (
        ("+ float and back to uint8 (no photometric op)", {}),
        ("+ colour jitter (p = 1)", {"jitter_prob": 1.0}),
        ("+ grayscale (p = 1)", {"grayscale_prob": 1.0}),
        ("+ Gaussian blur (p = 1)", {"blur_prob": 1.0}),
        ("+ solarize (p = 1)", {"solarize_prob": 1.0}),
    ):
        stages.append((name, data.ViewSpec(**{**off.__dict__, **change})))
    stages.append(("the official recipe: photometric=host", "host"))
    cases = []
    for name, what in stages:
        if what is None:
            cases.append((name, lambda: decode_only_batches(source, 32)))
        elif isinstance(what, str):
            cases.append((name, lambda mode=what: bt_jax_batches(source, 224, 32, mode)))
        else:
            cases.append(
                (
                    name,
                    lambda spec=what: data.pretrain_batches(
                        source,
                        global_batch=32,
                        image_size=224,
                        seed=0,
                        views={"a": spec, "b": spec},
                        process_index=0,
                        process_count=1,
                        num_workers=1,
                    ),
                )
            )
    return cases


def measure(make, batch: int, seconds: float, warmup: int = 2) -> float:
    """Pairs per second of a fresh iterator after `warmup` batches, over about `seconds`."""
    it = make()
    for _ in range(warmup):  # tracing, thread or worker start-up, first permutation
        next(it)
    start, pairs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(it)
        pairs += batch
    rate = pairs / (time.perf_counter() - start)
    del it  # stops tf.data's threads / the DataLoader's worker before the next case
    return rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--against-torchvision",
        action="store_true",
        help="also the official PyTorch recipe (needs torch and torchvision)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="another bt_jax checkout to measure side by side (host photometric)",
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="per case and round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the table gives medians")
    parser.add_argument("--core", type=int, default=0, help="the CPU core everything runs on")
    parser.add_argument("--sizes", default="32,224", help="output sizes to measure: 32, 224")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: where the host pipeline's time goes at 224 px",
    )
    args = parser.parse_args(argv)
    sizes = {int(s) for s in args.sizes.split(",")}
    pin_to_core(args.core)
    if args.against_torchvision:
        try:  # before TensorFlow: importing torchvision after it can crash (both bundle libs)
            import torch
            import torchvision  # noqa: F401
        except ImportError:
            sys.exit(
                "error: --against-torchvision needs torch and torchvision; run this with "
                "/work/bench-venv/bin/python (torch 2.14.1, torchvision 0.29.1), or "
                "pip install torch torchvision"
            )
        torch.set_num_threads(1)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    from bt_jax import data
    from bt_jax.data.tf_runtime import tf

    pin_to_core(args.core)  # TF's threads too

    with tempfile.TemporaryDirectory() as tmp:
        groups = []  # (title, image_size, batch, [(case name, make iterator or rate fn)])
        if 32 in sizes and not args.profile:
            small = photo_crops(512, 32, 32)
            folder32 = os.path.join(tmp, "jpeg32")
            write_jpegs(small, folder32)
            files32 = data.load_source("folder", folder32)
            memory32 = data.from_arrays("mem32", small, None, small[:1], None)
            cases = [
                (
                    f"bt_jax, photometric={mode}, {name}",
                    lambda src=src, mode=mode: bt_jax_batches(src, 32, 128, mode),
                )
                for name, src in (
                    ("32 x 32 JPEG files", files32),
                    ("32 x 32 uint8 in memory", memory32),
                )
                for mode in ("host", "device")
            ]
            if args.against_torchvision:
                cases.append(
                    (
                        "torchvision (official recipe), 32 x 32 JPEG files",
                        lambda: torchvision_batches(folder32, 32, 128),
                    )
                )
            if args.baseline:
                cases.append(
                    (f"bt_jax at {args.baseline}, 32 x 32 JPEG files", ("baseline", folder32))
                )
            groups.append(("32 px", 32, 128, cases))
        if 224 in sizes and not args.profile:
            folder224 = os.path.join(tmp, "jpeg224")
            write_jpegs(photo_crops(128, 375, 500, seed=1), folder224)
            files224 = data.load_source("folder", folder224)
            cases = [
                (
                    f"bt_jax, photometric={mode}, 500 x 375 JPEG files",
                    lambda mode=mode: bt_jax_batches(files224, 224, 32, mode),
                )
                for mode in ("host", "device")
            ]
            if args.against_torchvision:
                cases.append(
                    (
                        "torchvision (official recipe), 500 x 375 JPEG files",
                        lambda: torchvision_batches(folder224, 224, 32),
                    )
                )
            if args.baseline:
                cases.append(
                    (f"bt_jax at {args.baseline}, 500 x 375 JPEG files", ("baseline", folder224))
                )
            groups.append(("224 px", 224, 32, cases))

        if args.profile:
            folder224 = os.path.join(tmp, "jpeg224")
            write_jpegs(photo_crops(128, 375, 500, seed=1), folder224)
            groups = [
                (
                    "224 px, where the time goes",
                    224,
                    32,
                    profile_cases(data.load_source("folder", folder224)),
                )
            ]
        rates = {name: [] for _, _, _, cases in groups for name, _ in cases}
        for round_ in range(args.repeats):
            for _, size, batch, cases in groups:
                for name, make in cases:
                    if isinstance(make, tuple):
                        rate = baseline_rate(
                            args.baseline, args.core, make[1], size, batch, args.seconds
                        )
                    else:
                        rate = measure(make, batch, args.seconds)
                    rates[name].append(rate)
                    print(
                        f"round {round_ + 1}: {name}: {rate:,.1f} pairs/s",
                        file=sys.stderr,
                        flush=True,
                    )

    load = os.getloadavg()
    print(
        f"CPU: one core (core {args.core}) of {os.cpu_count()}; TF {tf.__version__}; "
        f"{args.repeats} alternating rounds of ~{args.seconds:g} s per case; load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)\n"
    )
    if args.profile:
        _, _, batch, cases = groups[0]
        print(f"**Where the host pipeline's time goes** (224 px, batch {batch}, one core)\n")
        print("| stage | pairs/s (median) | ms per pair | ms per pair added by the stage |")
        print("| --- | --- | --- | --- |")
        previous = stage_base = None
        for index, (name, _) in enumerate(cases):
            ms = 1000.0 / float(np.median(rates[name]))
            base = previous if index < 3 else stage_base  # photometric ops: each vs stage 3
            added = "" if base is None else f"{ms - base:+.2f}"
            print(f"| {name} | {float(np.median(rates[name])):,.1f} | {ms:.2f} | {added} |")
            if index == 2:
                stage_base = ms
            previous = ms
        return 0
    for title, size, batch, cases in groups:
        reference = next((n for n, _ in cases if n.startswith("torchvision")), None)
        print(f"**{title}** (batch {batch})\n")
        header = "| input pipeline | pairs/s per core (median) | range |"
        print(header + (" vs torchvision |" if reference else ""))
        print("| --- | --- | --- |" + (" --- |" if reference else ""))
        for name, _ in cases:
            median = float(np.median(rates[name]))
            line = f"| {name} | {median:,.1f} | {min(rates[name]):,.1f} - {max(rates[name]):,.1f} |"
            if reference:
                line += f" {median / float(np.median(rates[reference])):.2f}x |"
            print(line)
        uint8_bytes = 2 * size * size * 3
        print(
            f"\nBytes per pair sent to the device at {size} px: {uint8_bytes:,} as uint8 "
            f"(bt_jax), {4 * uint8_bytes:,} as float32.\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

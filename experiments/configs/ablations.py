"""The paper's ablations (300-epoch ImageNet ResNet-50 baseline) as one config with an argument.

    python -m bt_jax.train --config=experiments/configs/ablations.py:lambd=0.002 --workdir=...
    python -m bt_jax.train --config=experiments/configs/ablations.py:projector=16384 --workdir=...
    python -m bt_jax.train --config=experiments/configs/ablations.py:batch_size=256 --workdir=...

`python experiments/configs/ablations.py` prints every run of the sweeps.

Batch size uses the official best learning rate per batch size (issue #7 of the official code,
300 epochs, the old loss scale 0.024 with one learning rate for all parameters). On the current
scale a rate lr_old becomes learning_rate_weights = lr_old (the trust ratio makes the weight
update blind to the loss scale) and learning_rate_biases = 0.024 * lr_old (biases and BN
parameters see gradients 1 / 0.024 larger); both still times batch / 256.
"""

from experiments.configs import imagenet_resnet50_300ep

OLD_LOSS_SCALE = 0.024
SWEEPS = {
    # Paper Fig. 5: "not very sensitive" over 0.002-0.020.
    "lambd": (0.002, 0.0051, 0.01, 0.02),
    # Paper Fig. 4: accuracy keeps rising with the width, up to 16384 (3 layers each).
    "projector": (512, 1024, 2048, 4096, 8192, 16384),
    # Paper Fig. 2, with the official per-batch-size learning rates.
    "batch_size": (128, 256, 512, 1024, 2048, 4096),
}
BEST_LEARNING_RATE = {128: 0.7, 256: 0.4, 512: 0.3, 1024: 0.25, 2048: 0.2, 4096: 0.2}


def get_config(arg: str = "lambd=0.0051"):
    config = imagenet_resnet50_300ep.get_config()
    key, _, value = arg.partition("=")
    if key not in SWEEPS:
        raise ValueError(f"Unknown ablation {key!r}; use one of {sorted(SWEEPS)} as KEY=VALUE.")
    if key == "lambd":
        config.loss.lambd = float(value)
    elif key == "projector":
        width = int(value)
        config.model.projector = f"{width}-{width}-{width}"
    else:
        batch = int(value)
        if batch not in BEST_LEARNING_RATE:
            raise ValueError(
                f"No official learning rate for batch {batch}; use one of "
                f"{sorted(BEST_LEARNING_RATE)}."
            )
        config.batch_size = batch
        config.optim.learning_rate_weights = BEST_LEARNING_RATE[batch]
        config.optim.learning_rate_biases = OLD_LOSS_SCALE * BEST_LEARNING_RATE[batch]
    return config


if __name__ == "__main__":
    for key, values in SWEEPS.items():
        for value in values:
            print(f"--config=experiments/configs/ablations.py:{key}={value}")

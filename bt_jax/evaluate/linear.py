"""The linear protocol, the paper's: a linear classifier on the frozen backbone.

Frozen backbone in inference mode, a linear layer on the pooled representation (weights
N(0, 0.01), bias 0), SGD momentum 0.9 with weight decay (added to the gradient, as
torch.optim.SGD does), a cosine learning rate stepped per epoch (official evaluate.py:
CosineAnnealingLR(T_max=epochs)), RandomResizedCrop + flip for training, resize + centre crop
for testing. Top-1 and top-5. Each step runs on every device (GSPMD over the batch).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from absl import logging

from bt_jax import parallel
from bt_jax.data import photometric
from bt_jax.evaluate import classifier
from bt_jax.evaluate.context import Backbone, Context, register


def linear_optimizer(
    learning_rate: float, weight_decay: float, num_epochs: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    cosine = optax.cosine_decay_schedule(learning_rate, decay_steps=num_epochs)
    schedule = lambda count: cosine(count // steps_per_epoch)  # noqa: E731
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=0.9))


@functools.lru_cache(maxsize=16)
def _trainer(
    module,
    head,
    learning_rate: float,
    weight_decay: float,
    num_epochs: int,
    steps_per_epoch: int,
    mesh,
):
    """(tx, jitted step); cached so the pretrained and baseline runs share one compilation."""
    tx = linear_optimizer(learning_rate, weight_decay, num_epochs, steps_per_epoch)
    replicated = parallel.replicated(mesh)

    def step(variables, head_params, opt_state, batch):
        representation = module.apply(variables, photometric.normalize(batch["image"]), train=False)
        representation = jax.lax.stop_gradient(representation.astype(np.float32))

        def loss_fn(params):
            logits = head.apply({"params": params}, representation)
            return classifier.cross_entropy(logits, batch["label"])

        loss, grads = jax.value_and_grad(loss_fn)(head_params)
        updates, opt_state = tx.update(grads, opt_state, head_params)
        return optax.apply_updates(head_params, updates), opt_state, loss

    return tx, jax.jit(step, out_shardings=(replicated, replicated, replicated))


@register("linear")
def linear(context: Context, backbone: Backbone) -> dict:
    """{"top1", "top5", "epochs", "train_examples"}."""
    settings = context.config.eval
    indices = classifier.labelled_train_indices(context.source)
    batch_size = classifier.batch_size_for(
        settings.linear_batch_size, len(indices), context.mesh.size
    )
    steps_per_epoch = len(indices) // batch_size
    head = classifier.linear_head(context.num_classes)
    tx, step = _trainer(
        context.module,
        head,
        float(settings.linear_learning_rate),
        float(settings.linear_weight_decay),
        int(settings.linear_epochs),
        steps_per_epoch,
        context.mesh,
    )
    placed = context.placed(backbone)
    head_params = parallel.replicate(
        classifier.init_head(head, context.module.num_features, context.config.seed), context.mesh
    )
    opt_state = tx.init(head_params)
    losses = []
    for i, batch in enumerate(
        classifier.training_batches(
            context, indices, batch_size=batch_size, num_epochs=settings.linear_epochs
        )
    ):
        head_params, opt_state, loss = step(placed, head_params, opt_state, batch)
        losses.append(loss)
        if (i + 1) % steps_per_epoch == 0:
            logging.info(
                "linear: epoch %d/%d, loss %.4f",
                (i + 1) // steps_per_epoch,
                settings.linear_epochs,
                float(np.mean(parallel.to_host(losses))),
            )
            losses = []
    accuracy = classifier.test_accuracy(context, head, backbone, parallel.to_host(head_params))
    return {**accuracy, "epochs": int(settings.linear_epochs), "train_examples": int(len(indices))}

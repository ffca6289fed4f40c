"""The fine-tuning (semi-supervised) protocol, the paper's, on class-balanced label subsets.

For each fraction of ``config.eval.label_fractions`` (1% and 10%): the whole network and a new
head trained on that subset with train-mode BatchNorm (over the global batch: GSPMD), SGD
momentum 0.9, no weight decay, backbone and head learning rates multiplied by 0.2 after 60% and
80% of the epochs (the paper: epochs 12 and 16 of 20). Top-1 and top-5 on the test split.
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


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices int64 of a class-balanced subset holding about ``fraction`` of the labels.

    Per class c (labels -1 are never chosen): the first max(1, round(fraction * n_c)) of a
    permutation of that class's examples seeded by (seed, c). A pure function of its arguments,
    and nested: a smaller fraction's subset is inside a larger one's.
    """
    labels = np.asarray(labels)
    chosen = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        count = max(1, int(round(fraction * len(members))))
        order = np.random.default_rng([seed, int(c)]).permutation(len(members))
        chosen.append(members[order[:count]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def fraction_name(fraction: float) -> str:
    """0.01 -> "1%", 0.1 -> "10%", 0.005 -> "0.5%"."""
    return f"{fraction * 100:g}%"


def finetune_optimizer(
    backbone_learning_rate: float, head_learning_rate: float, num_epochs: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    boundaries = {int(round(f * num_epochs)) * steps_per_epoch: 0.2 for f in (0.6, 0.8)}

    def sgd(learning_rate):
        return optax.sgd(optax.piecewise_constant_schedule(learning_rate, boundaries), momentum=0.9)

    return optax.multi_transform(
        {"backbone": sgd(backbone_learning_rate), "head": sgd(head_learning_rate)},
        {"backbone": "backbone", "head": "head"},
    )


@functools.lru_cache(maxsize=16)
def _trainer(
    module,
    head,
    backbone_learning_rate: float,
    head_learning_rate: float,
    num_epochs: int,
    steps_per_epoch: int,
    mesh,
):
    """(tx, jitted step); cached so the pretrained and baseline runs share one compilation."""
    tx = finetune_optimizer(backbone_learning_rate, head_learning_rate, num_epochs, steps_per_epoch)
    replicated = parallel.replicated(mesh)

    def step(params, batch_stats, opt_state, batch):
        def loss_fn(params):
            representation, updates = module.apply(
                {"params": params["backbone"], "batch_stats": batch_stats},
                photometric.normalize(batch["image"]),
                train=True,
                mutable=["batch_stats"],
            )
            logits = head.apply({"params": params["head"]}, representation.astype(np.float32))
            return classifier.cross_entropy(logits, batch["label"]), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return tx, jax.jit(step, out_shardings=(replicated,) * 4, donate_argnums=(0, 1, 2))


def finetune_subset(context: Context, backbone: Backbone, indices: np.ndarray) -> dict:
    """Fine-tunes backbone + a new head on the train examples ``indices``; test accuracy."""
    settings = context.config.eval
    batch_size = classifier.batch_size_for(
        settings.finetune_batch_size, len(indices), context.mesh.size
    )
    steps_per_epoch = len(indices) // batch_size
    head = classifier.linear_head(context.num_classes)
    tx, step = _trainer(
        context.module,
        head,
        float(settings.finetune_backbone_learning_rate),
        float(settings.finetune_head_learning_rate),
        int(settings.finetune_epochs),
        steps_per_epoch,
        context.mesh,
    )
    params = parallel.replicate(
        {
            "backbone": backbone.variables["params"],
            "head": classifier.init_head(head, context.module.num_features, context.config.seed),
        },
        context.mesh,
    )
    batch_stats = parallel.replicate(backbone.variables["batch_stats"], context.mesh)
    opt_state = tx.init(params)
    loss = None
    for batch in classifier.training_batches(
        context, indices, batch_size=batch_size, num_epochs=settings.finetune_epochs
    ):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, batch)
    if loss is not None:
        logging.info(
            "finetune on %d examples: last loss %.4f", len(indices), float(parallel.to_host(loss))
        )
    params, batch_stats = parallel.to_host((params, batch_stats))
    tuned = Backbone(
        f"{backbone.name} fine-tuned", {"params": params["backbone"], "batch_stats": batch_stats}
    )
    return classifier.test_accuracy(context, head, tuned, params["head"])


@register("finetune")
def finetune(context: Context, backbone: Backbone) -> dict:
    """{"1%": {"top1", "top5", "num_labelled"}, "10%": {...}, ...}."""
    labels = classifier.train_labels(context.source)
    classifier.labelled_train_indices(context.source)  # fails clearly when nothing is labelled
    results = {}
    for fraction in context.config.eval.label_fractions:
        indices = label_subset(labels, fraction, context.config.seed)
        accuracy = finetune_subset(context, backbone, indices)
        results[fraction_name(fraction)] = {**accuracy, "num_labelled": int(len(indices))}
    return results

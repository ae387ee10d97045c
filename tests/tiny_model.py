"""A tiny model in the project's exact architecture whose predictions differ from image to image,
made in seconds without training (the predict and export tests need predictions that vary)."""
from __future__ import annotations

import numpy as np

from stages import train
from tests.conftest import train_params


def tiny_model(images: np.ndarray, seed: int = 0):
    """`train.build_model` at the images' size (alpha 0.25, no weights), batch norm set from `images`.

    Untrained, MobileNet's activations fade to zero through its 27 batch norms and every image gets
    1/7 per class; one training-mode call with momentum 0 sets each norm's statistics to the batch's.
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = train.build_model(images.shape[1], train_params())
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum, layer.trainable = 0.0, True  # a frozen norm would ignore training=True
    model(images.astype(np.float32), training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
    return model

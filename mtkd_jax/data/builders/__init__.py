"""Offline datasets packaged as TFDS builders (array_record, no TensorFlow, no network).

Each is prepared on first use into the TFDS data dir and read back like any TFDS dataset.
`OFFLINE_BUILDERS` maps the name given to `mtkd_jax.data.load` to the builder class; it also
says, through `OFFLINE_RAW_MAX`, what the stored values are scaled by (uint8 images: 255,
sklearn digits: 16, MNIST-1D signals: not scaled). `TEXT_BUILDERS` are the text domains
of `mtkd_jax.data.corpora` (documents, not examples: read by `corpora.load_domain`).
"""

from mtkd_jax.data.builders.digits_builder import MAX_INTENSITY, Digits
from mtkd_jax.data.builders.mnist1d_builder import Mnist1d, generate_mnist1d
from mtkd_jax.data.builders.mnist5k_builder import Mnist5k
from mtkd_jax.data.builders.text_builders import TEXT_BUILDERS

OFFLINE_BUILDERS = {"mnist1d": Mnist1d, "mnist5k": Mnist5k, "digits": Digits}
OFFLINE_RAW_MAX = {"mnist1d": None, "mnist5k": 255, "digits": MAX_INTENSITY}

__all__ = [
    "OFFLINE_BUILDERS",
    "OFFLINE_RAW_MAX",
    "TEXT_BUILDERS",
    "Digits",
    "Mnist1d",
    "Mnist5k",
    "generate_mnist1d",
]

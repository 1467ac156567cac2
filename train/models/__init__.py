"""Model builders; importing this package registers them all."""

from . import hits, images  # noqa: F401

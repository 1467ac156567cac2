"""Model builders; importing this package registers them all."""

from . import hits  # noqa: F401

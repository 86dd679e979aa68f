"""Names `deepmetric.heads` imports from here; they live in `deepmetric.losses.base`."""

from deepmetric.losses.base import check_number, masked_logsumexp

__all__ = ["check_number", "masked_logsumexp"]

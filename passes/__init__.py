"""Graph-rewrite passes that swap matmul/collective subgraphs for fcpass ops."""

from passes.flashcomm import FlashCommPass

__all__ = ["FlashCommPass"]

"""Graph-rewrite passes that swap matmul/collective subgraphs for fcpass ops."""

from passes.manager import FlashCommPass

__all__ = ["FlashCommPass"]

"""What the tests share: cases and their references, rank bodies, the shared ranks, graph builders, process starters."""

"""Bounds every fcpass setting is validated against: wide enough for any real deployment, narrow enough to
catch a typo (a threshold of -1, a world size of 0). A leaf: the config and the threshold table both read it."""

BACKEND_CHOICES = ("auto", "npu", "cuda", "generic", "off")
MAX_THRESHOLD_TOKENS = 1 << 24
WORLD_SIZE_RANGE = (2, 1024)
MAX_PIPELINE_CHUNKS = 64

"""The tests' name for fcpass.launch (ranks must import rank bodies by module name)."""

from fcpass.launch import free_port, run_ranks  # noqa: F401

"""headcache: run a frozen backbone once, train classification heads from its cached hidden states."""

__version__ = "0.1.0"

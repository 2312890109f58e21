"""dvcray: run DVC experiments on Ray clusters."""

__version__ = "0.1.0"

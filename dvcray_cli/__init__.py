"""dvcray: run DVC experiments on Ray clusters."""

__version__ = "0.1.0"


def compatible(version: str | None, other: str | None = None) -> bool:
    """Whether dvcray ``version`` and ``other`` (default: this one) share the
    snapshot, manifest and store formats: the same major and minor version."""
    other = other or __version__
    return bool(version) and version.split(".")[:2] == other.split(".")[:2]

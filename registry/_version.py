"""Single source of the distribution's version (read by hatchling and by `engine`)."""

__version__ = "0.1.0"

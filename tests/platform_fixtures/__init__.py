"""Helpers for the platform, distributed and executor tests: tiny worker classes
and the sources of tiny out-of-tree platform plugin packages."""

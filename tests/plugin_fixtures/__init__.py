"""Tiny plugin packages and helpers for the registry and `engine plugins` tests."""

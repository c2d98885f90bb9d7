"""Tests of the sync coordinator and client (a package so its conftest does not shadow tests/conftest.py)."""

"""Fixtures for the targets tests."""

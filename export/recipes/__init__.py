"""Reproducible recipes that rebuild shipped artifacts with `tsad-export`."""

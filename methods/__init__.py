"""Tuning methods, one file each. Every module here is imported by the registry."""

"""Experiments that compare the two frameworks (see README)."""

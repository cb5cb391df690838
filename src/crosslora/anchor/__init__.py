"""Anchoring two models' spaces in what they share: the vocabulary, and the base weights."""

"""kvpage-cache."""

"""kvpage-runtime."""

"""kvpage-sched."""

"""envs — filled in by later issues."""

"""policies — filled in by later issues."""

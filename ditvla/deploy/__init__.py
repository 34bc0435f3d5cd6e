"""deploy — filled in by later issues."""

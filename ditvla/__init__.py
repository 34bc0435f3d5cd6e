"""ditvla."""

"""The Redis call store."""

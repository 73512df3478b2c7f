"""Fraud and flood defence: risk outcomes, bans, signals counted for the detectors."""

"""The media plane's features, each a module of the same anatomy (see media/feature.py)."""

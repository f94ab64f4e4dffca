"""boot package."""

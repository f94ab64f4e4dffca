"""quote package."""

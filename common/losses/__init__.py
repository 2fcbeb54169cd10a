"""losses of the shared package."""

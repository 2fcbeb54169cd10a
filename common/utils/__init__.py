"""utils of the shared package."""

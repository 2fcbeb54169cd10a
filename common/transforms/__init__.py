"""transforms of the shared package."""

"""data of the shared package."""

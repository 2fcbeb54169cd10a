"""networks of the shared package."""

"""metrics of the shared package."""

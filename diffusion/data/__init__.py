"""Image sources and the batch pipeline (knows nothing about models)."""

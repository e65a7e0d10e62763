"""batchlab worker."""

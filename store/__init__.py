"""batchlab store."""

"""batchlab trainer."""

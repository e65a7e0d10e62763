"""batchlab batchlab."""

"""batchlab server."""

"""batchlab frontend."""

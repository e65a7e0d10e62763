"""Dependency-free rules shared by every layer: settings, run statuses, JSON-safe numbers,
atomic file writes, validation messages.

The bottom of the import graph: ``core`` imports nothing of batchlab (and no torch, no
SQLAlchemy), so the trainer, the store, the worker, the server and the client may all use it.
"""

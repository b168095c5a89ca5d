"""Scorers and ground-truth suites. May use ``tools``; knows nothing of ``agent``."""

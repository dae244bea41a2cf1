"""The aptitude suite: fixed questions with automatic scorers, run on every backend."""

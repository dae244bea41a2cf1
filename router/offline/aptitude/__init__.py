"""The aptitude suite's builder, scorers and runner: fixed questions with automatic scorers, run
on every backend (the suite itself ships as router/data/aptitude_suite.jsonl)."""

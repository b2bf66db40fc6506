"""Task suites for judging merges: the built-in synthetic suite (tasks, build, evaluation, demo), the
SmolLM2 suite, synthetic model families for tests, and the TaskSuite protocol any suite implements."""

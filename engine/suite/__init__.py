"""Task suites for judging merges, and the TaskSuite protocol any suite implements (protocol).

The built-in synthetic suite: tasks (tasks and tokenizer), build (SuiteConfig, its variants, the
self-checking build, Suite), train (the training loop), manifest (fingerprint, task-vector statistics,
check), evaluate (greedy decoding, accuracy, ANP), demo (Comparison, `blockmerge demo`).
The SmolLM2 suite: llm_tasks, llm (LlmSuite, evaluation), llm_train (experts, adapters), llm_diagnose.
synth: synthetic model families for tests and benchmarks."""

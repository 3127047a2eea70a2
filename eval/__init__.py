"""Evaluation: windowed perplexity (ppl), downstream tasks (downstream), the paper's logit analysis (logit_analysis).

common   loading models / tokenizers / token sets for standalone runs, compatibility checks
live     glue for callbacks inside a training run (config access, data dir, tokenizer)
testing  tiny models, tokenizers and data sets, and a 2-rank CPU ZeRO-3 harness used by the tests
See docs/evaluation.md.
"""

"""Evaluation: windowed perplexity (ppl), downstream tasks (downstream), the paper's logit analysis (logit_analysis).

common   loading models / tokenizers / token sets for standalone runs, compatibility checks
report   a grid's run directories -> report.md / .csv / plots
See docs/evaluation.md.
"""

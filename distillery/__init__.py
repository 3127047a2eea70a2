"""Distillery: knowledge distillation during LLM pretraining (PyTorch + DeepSpeed)."""

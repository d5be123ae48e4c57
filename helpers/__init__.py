"""Reusable code for the gemma4-finetune notebooks."""

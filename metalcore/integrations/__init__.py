"""Opt-in, reversible integrations with other libraries (Hugging Face transformers)."""

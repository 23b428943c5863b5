"""Hugging Face <-> moejax weight conversion (safetensors in and out; never unpickles)."""

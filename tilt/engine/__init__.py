"""The model side: sampling from and scoring Hugging Face causal LMs. Touches transformers; the math does not."""

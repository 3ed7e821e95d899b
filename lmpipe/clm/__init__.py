"""The causal language model: a decoder, next-token batches, references, generation, prompting."""

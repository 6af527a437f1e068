"""Text: the CLIP tokenizer (with a bundled BPE vocabulary) and the prompt embeddings' cache."""

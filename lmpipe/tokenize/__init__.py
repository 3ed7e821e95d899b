"""The `tokenize` stage: the WordPiece tokenizer and the packed token arrays pretraining reads."""

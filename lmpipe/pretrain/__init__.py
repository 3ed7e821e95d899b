"""The `pretrain` stage: masked-LM pretraining of the encoder from the token arrays."""

"""Model loading, transformer shards, quantization, activation codecs."""

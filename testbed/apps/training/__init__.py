"""Split LoRA fine-tuning: a device and a chain of stage servers train one model's adapters."""

"""The ZeroMQ message format: typed header (``message``) plus raw payload frames whose layout per
activation encoding is fixed here too (``payload``); tensors are the model's business."""

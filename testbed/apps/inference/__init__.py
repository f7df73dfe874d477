"""Split inference: shard servers, the split client (driver), placement and suite sessions."""

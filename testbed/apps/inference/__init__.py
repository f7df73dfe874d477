"""Split inference: node programs and their settings, shard server, split client, placement, the
`testbed infer` driver and suite sessions."""

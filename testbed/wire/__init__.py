"""The ZeroMQ message format: typed header plus raw tensor frames."""

"""Tools that read a finished output: verify, inspect, re-embed."""

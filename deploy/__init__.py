"""The Ray Serve query service: query encoder, shard searchers, HTTP ingress and web page."""

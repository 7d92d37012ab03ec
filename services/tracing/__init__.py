"""Reading traces people can use: a JSON-lines span exporter and the `tessera trace` waterfall."""

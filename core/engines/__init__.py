"""Forecast engines: each turns a request and a market snapshot into price paths."""

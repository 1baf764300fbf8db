"""Fake external APIs for tests and the demo: real aiohttp servers on 127.0.0.1, with fault injection."""

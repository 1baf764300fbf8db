"""Local stand-ins for the external APIs, used by the tests, the demo and the benchmarks.

`traffic` makes seeded, realistic Events API envelopes; `events` serves them over HTTP exactly like the
Events API, with fault injection on request. Nothing here ever talks to the real services.
"""

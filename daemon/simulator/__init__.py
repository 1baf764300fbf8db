"""Local stand-ins for the external APIs, used by the tests, the demo and the benchmarks.

Real aiohttp servers on 127.0.0.1 with fault injection: `events` serves the Events API (with seeded traffic
from `traffic`), `statbate` the Statbate Plus API and `stats` the Chaturbate Stats API. Nothing here ever
talks to the real services.
"""

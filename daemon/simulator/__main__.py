"""`python -m daemon.simulator`: run the Events API simulator on its own until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from daemon.simulator import events, traffic


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m daemon.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--username", default=traffic.DEFAULT_BROADCASTER)
    parser.add_argument("--token", default="simulatortoken0123456789")
    parser.add_argument("--backlog", type=int, default=1000, help="events to serve")
    parser.add_argument("--rate", type=float, default=None, help="events per second (default: all at once)")
    parser.add_argument("--shows", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--malformed-rate", type=float, default=0.0, help="share of malformed events")
    parser.add_argument("--empty-400", action="store_true", help="answer an empty wait with HTTP 400")
    for name in events.FaultRates.__dataclass_fields__:
        parser.add_argument(f"--p-{name.replace('_', '-')}", type=float, default=0.0, dest=f"p_{name}")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    stream = traffic.build(args.backlog, seed=args.seed, shows=args.shows, malformed_rate=args.malformed_rate)
    rates = events.FaultRates(
        **{name: getattr(args, f"p_{name}") for name in events.FaultRates.__dataclass_fields__}
    )
    simulator = events.EventsSimulator(
        username=args.username,
        token=args.token,
        events=stream.events,
        rate=args.rate,
        page_size=args.page_size,
        seed=args.seed,
        rates=rates,
        empty_status=400 if args.empty_400 else 200,
        host=args.host,
        port=args.port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with simulator:
        print(simulator.base_url, flush=True)
        await stop.wait()
    print(f"served {simulator.request_count} requests", flush=True)


def main() -> None:
    asyncio.run(_serve(_parser().parse_args()))


if __name__ == "__main__":
    main()

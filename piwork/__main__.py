"""Command line for piwork: ``piwork [--json] [--seed S] N``.

Estimates pi from N million Monte Carlo samples on every core this process may use, and
reports the estimate, the sample count, the wall time, the core count and the host, either
as a short aligned table for people or as one JSON object for programs (such as vesta,
which runs it as an example workload on remote machines).

Exit status: 0 on success, 2 on bad usage, 130 when interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal, InvalidOperation

from piwork import Estimate, estimate

SAMPLES_PER_UNIT = 1_000_000
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parse_millions(text: str) -> int:
    """Convert N (millions of samples, possibly a decimal like ``0.5``) to a sample count.

    ``Decimal`` is used so that e.g. ``0.2`` means exactly 200,000 samples, with no float
    rounding. N must be finite, positive, and name a whole number of samples.
    """
    try:
        millions = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not millions.is_finite():
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if millions <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    samples = millions * SAMPLES_PER_UNIT
    if samples != samples.to_integral_value():
        raise argparse.ArgumentTypeError(
            f"must be a whole number of samples (at most 6 decimal places), got {text!r}"
        )
    return int(samples)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser; kept separate so the usage text is defined in one place."""
    parser = argparse.ArgumentParser(
        prog="piwork",
        description=(
            "Estimate pi from N million Monte Carlo samples, using one worker process per "
            "core this process may run on."
        ),
        epilog="Exit status: 0 on success, 2 on bad usage, 130 when interrupted.",
    )
    parser.add_argument(
        "samples",
        metavar="N",
        type=parse_millions,
        help="millions of samples to draw; may be a decimal, e.g. 0.5 for 500,000",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object {"pi", "samples", "seconds", "cores", "host"}',
    )
    parser.add_argument(
        "--seed",
        metavar="S",
        type=int,
        default=None,
        help="integer seed for a repeatable run (same seed and core count, same estimate); "
        "without it every run uses fresh randomness",
    )
    return parser


def format_report(result: Estimate) -> str:
    """Render a result as the short aligned table meant for people."""
    rows = [
        ("pi", f"{result.pi:.7f}"),
        ("samples", f"{result.samples:,}"),
        ("seconds", f"{result.seconds:.2f}"),
        ("cores", str(result.cores)),
        ("host", result.host),
    ]
    width = max(len(label) for label, _ in rows) + 3
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def format_json(result: Estimate) -> str:
    """Render a result as one JSON object meant for programs."""
    return json.dumps(
        {
            "pi": result.pi,
            "samples": result.samples,
            "seconds": round(result.seconds, 3),
            "cores": result.cores,
            "host": result.host,
        }
    )


def main(argv: list[str] | None = None) -> int:
    """Run piwork with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    argparse reports usage errors (and ``--help``) by raising ``SystemExit``; that is turned
    into a return value here so callers always get an ``int`` back, as the signature says.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    try:
        result = estimate(args.samples, seed=args.seed)
    except KeyboardInterrupt:
        print("piwork: interrupted, workers stopped", file=sys.stderr)
        return EXIT_INTERRUPTED

    print(format_json(result) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the argparse command lines (bench, export, bench infer) share: value types, and the
arguments that choose a model; and what the absl ones without inputs (evaluate, report, train)
check of their words, how every absl one (evaluate, predict, report, train) runs, and how a
Ctrl-C ends them and export."""
import argparse
import math
import os
import signal
import sys


def at_least(minimum: int):
    """argparse type: an integer >= MINIMUM (a batch or repeat count of 0 would time or export
    nothing, or silently mean the default)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0 (a peak of 0 divided by zero after minutes of timing)."""
    value = float(text)
    if not 0 < value < float("inf"):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def number(text: str) -> float:
    """argparse type: a float that is not nan (nan compares false with every bound: a nan deadline
    never came)."""
    value = float(text)
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be a number, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--workdir, --checkpoint and --members, as jaxseg.inference.load_or_exit takes them."""
    parser.add_argument("--workdir", help="training workdir (default: the pretrained model)")
    parser.add_argument("--checkpoint", default="best",
                        help="'best' (the latest where there is none), 'latest' or a step number")
    parser.add_argument("--members", type=at_least(0), default=0,
                        help="pretrained ensemble: use its first N members (0 = all; fewer is "
                             "faster)")


def refuse_positional(argv: list[str]) -> None:
    """absl.app.UsageError for words after the program name in an absl command line's ARGV: absl
    leaves them there unread, so `--dataset ccp_person validation` scored the default test split."""
    if len(argv) > 1:
        from absl import app

        raise app.UsageError(f"unexpected argument(s) {' '.join(argv[1:])}: every setting is a "
                             "--flag (--name value or --name=value); see --helpshort")


def run_absl(main, **kwargs) -> None:
    """absl.app.run(MAIN, **KWARGS), where asking for help (--help, -h, -?, --helpshort,
    --helpfull, --helpxml) exits 0: absl's help flags exit 1, which a script asking for help reads
    as a failure. A usage error MAIN raises is its message alone (absl prints the whole help above
    it), with absl's status; a Ctrl-C is one line too (interrupted_in_one_line)."""
    from absl import app, flags

    app.define_help_flags()  # app.run defines them too: it does so once
    # -h is help in the argparse CLIs (sweep, export, bench). An absl alias rather than rewriting
    # argv: absl's own parser then decides, so `--output -h` stays the value of --output.
    if "h" not in flags.FLAGS:
        flags.DEFINE_alias("h", "help")
    for name in ("help", "helpshort", "helpfull", "helpxml"):
        flags.FLAGS[name].parse = _help_exits_0(flags.FLAGS[name].parse)
    app.run(_usage_error_in_one_line(interrupted_in_one_line(main)), **kwargs)


def interrupted_in_one_line(main):
    """MAIN, where a Ctrl-C ends the program with one line on stderr, not a traceback:
    'interrupted', and what the KeyboardInterrupt carries (what was written, what to do), as MAIN
    raises it again with that text. The program then dies by SIGINT, as Python ends one it does
    not catch (status 130 in a shell), so that a shell script running it stops too: bash takes a
    command that exits 130 itself for one that handled the Ctrl-C, and goes on with the script."""
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt as e:
            print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            # At once, as Python's own ending would not: with several processes, a normal exit
            # waits in JAX's shutdown barrier for the others (distributed.exit_with_error).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)
            os._exit(128 + signal.SIGINT)  # where SIGINT did not end it (blocked in this thread)
    return run


def _usage_error_in_one_line(main):
    # absl prints the module's docstring and every flag (about 55 lines) above a usage error's
    # message, which scrolled it out of sight; the argparse CLIs and predict print the line alone.
    # With the `error:` of the commands' other one-line errors (distributed.exit_with_error's).
    def run(argv):
        from absl import app

        try:
            return main(argv)
        except app.UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(e.exitcode) from None
    return run


def _help_exits_0(parse):
    # A help flag's parse exits only where help was asked for, once the help is printed.
    def parse_and_exit_0(arg):
        try:
            parse(arg)
        except SystemExit:
            raise SystemExit(0) from None
    return parse_and_exit_0

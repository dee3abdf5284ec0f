"""argparse value types shared by the argparse command lines (bench, export, bench infer)."""
import argparse


def at_least(minimum: int):
    """argparse type: an integer >= MINIMUM (a batch or repeat count of 0 would time or export
    nothing, or silently mean the default)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse

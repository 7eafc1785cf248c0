"""Command line: ``python -m kvmmmu demo``."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kvmmmu",
                                     description="kvmmmu: a model of the KVM x86 MMU")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short tour of what the model does today")
    demo.add_argument("--tdx", action="store_true",
                      help="a TD's life in both TDX code generations, side by side")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from kvmmmu.demo import run, run_tdx
        (run_tdx if args.tdx else run)(sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

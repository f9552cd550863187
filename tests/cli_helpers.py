"""What the tests of the command line share."""
from metalearn_fast.cli import main


def run_main(argv):
    """main(argv) in this process; its exit status (argparse's own errors included)."""
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own errors
        return exit.code

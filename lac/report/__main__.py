"""`python -m lac.report`."""

from lac.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

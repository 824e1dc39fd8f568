"""`python -m keplm.jobs.ablate` == `keplm ablate` (see keplm.jobs.sweep)."""

import sys

from keplm.jobs.common import module_main
from keplm.jobs.sweep import register_ablate as register


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())

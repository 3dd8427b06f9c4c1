"""`python -m mmpeft.quickstart [--task digits|shapes] [--shots 5,20 ...]`: the quickstart transfer tables of the
README (the code is `mmpeft.lab.transfer`; this short entry stays)."""

from mmpeft.lab.transfer import *  # noqa: F403
from mmpeft.lab.transfer import main

if __name__ == "__main__":
    main()

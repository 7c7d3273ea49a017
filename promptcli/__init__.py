"""promptcli: noise-robust prompt tuning of CLIP from the command line."""

__version__ = "0.1.0"

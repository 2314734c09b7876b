"""`python -m headcache ...`, and `torchrun ... -m headcache extract ...`: the same app as `headcache`."""
from headcache.cli import main

main()

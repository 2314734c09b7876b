"""`python cli.py ...` from a checkout: the same app as the `headcache` command."""
from headcache.cli import main

if __name__ == "__main__":
    main()

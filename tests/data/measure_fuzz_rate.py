"""Measure, outside the suite, how the reader takes random byte damage: ``python tests/data/measure_fuzz_rate.py N SEED``.

The suite's fuzz test (tests/test_store.py::TestReaderFuzz) runs a fixed 50 damages; this runs N of
them on the same small cache (1 to 8 bytes XORed anywhere in the file) and counts how each ended:
``error`` (a HeadcacheError), ``same`` (read the intact values: the damage hit unused bytes),
``silent`` (read other values without an error: a defect), ``other`` (another exception: a defect),
``hang`` (no answer in 20 s: a defect). Recorded for schema 3 in README.md ("What headcache guarantees").
"""
import random
import signal
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import test_store  # noqa: E402  (the suite's cache and its reading of everything)

import headcache.store as store  # noqa: E402
from headcache.errors import HeadcacheError  # noqa: E402


class _Hang(Exception):
    pass


def _alarm(*_) -> None:
    raise _Hang()


def main(n: int, seed: int) -> dict[str, int]:
    folder = Path(tempfile.mkdtemp())
    path = folder / "c.h5"
    chunk, store.CHUNK_BYTES = store.CHUNK_BYTES, 2 * test_store.D * 4  # as the suite's fuzz cache
    try:
        test_store.one_go(path, test_store.ragged([2, 0, 3, 1]), test_store.ragged([2, 1]))
    finally:
        store.CHUNK_BYTES = chunk
    raw, expected = path.read_bytes(), repr(test_store._read_everything(path))
    rng = random.Random(seed)
    counts = dict.fromkeys(("error", "same", "silent", "other", "hang"), 0)
    signal.signal(signal.SIGALRM, _alarm)
    for trial in range(n):
        damaged = bytearray(raw)
        spots = [(rng.randrange(len(raw)), rng.randrange(1, 256)) for _ in range(rng.randint(1, 8))]
        for position, flip in spots:
            damaged[position] ^= flip
        copy = folder / f"damaged-{trial}.h5"
        copy.write_bytes(bytes(damaged))
        signal.alarm(20)
        try:
            outcome = "same" if repr(test_store._read_everything(copy)) == expected else "silent"
        except HeadcacheError:
            outcome = "error"
        except _Hang:
            outcome = "hang"
        except Exception:  # noqa: BLE001 - any other exception is what this counts
            outcome = "other"
        finally:
            signal.alarm(0)
        counts[outcome] += 1
        if outcome in ("silent", "other", "hang"):
            print(outcome, spots)
        copy.unlink()
    return counts


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 600, int(sys.argv[2]) if len(sys.argv) > 2 else 1))

#!/usr/bin/env python3
"""What one fsync costs for scattered pages against appended ones, on the disk holding FOLDER.

    python3 tests/load/sync-cost.py [FOLDER]      # default: target/

Writes a 200 MiB file, then five times each: dirties N 4 KiB pages (at random offsets, or
appended at the end) and times the fsync. A checkpoint of the journal is the scattered case:
every dedup key lands on a random leaf page (docs/BENCHMARKS.md, session 6). Then, for the
log's own syncs, N pages rewritten in sequence inside the file, as in a log that started over,
and an fdatasync (session 7). Deletes the file.
"""
import os
import random
import sys
import time

PAGE = 4096
SIZE = 200 * 1024 * 1024


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "target"
    path = os.path.join(folder, "sync-cost.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        chunk = b"\1" * (1 << 20)
        for offset in range(0, SIZE, len(chunk)):
            if os.pwrite(fd, chunk, offset) != len(chunk):
                sys.exit("short write: is the disk full?")
        os.fsync(fd)
        end = [SIZE]
        page = b"\2" * PAGE

        def scattered(n):
            for _ in range(n):
                os.pwrite(fd, page, random.randrange(SIZE // PAGE) * PAGE)

        cursor = [0]

        def rewritten(n):
            for _ in range(n):
                os.pwrite(fd, page, cursor[0])
                cursor[0] = (cursor[0] + PAGE) % SIZE

        def appended(n):
            for _ in range(n):
                os.pwrite(fd, page, end[0])
                end[0] += PAGE

        def timed(dirty, n, sync):
            took = []
            for _ in range(5):
                dirty(n)
                started = time.perf_counter()
                sync(fd)
                took.append((time.perf_counter() - started) * 1000)
            return sorted(took)

        for label, dirty, n in [
            ("1 scattered page", scattered, 1),
            ("10 scattered pages", scattered, 10),
            ("100 scattered pages", scattered, 100),
            ("600 scattered pages", scattered, 600),
            ("100 appended pages", appended, 100),
            ("600 appended pages", appended, 600),
        ]:
            took = timed(dirty, n, os.fsync)
            print(f"{label:>24}: fsync median {took[2]:6.1f} ms  (runs: {' '.join(f'{t:.1f}' for t in took)})")
        for n in [1, 4, 16, 32, 64, 128]:
            took = timed(rewritten, n, os.fdatasync)
            label = f"{n} rewritten page{'s' if n > 1 else ''}"
            print(f"{label:>24}: fdatasync median {took[2]:6.2f} ms  (runs: {' '.join(f'{t:.2f}' for t in took)})")
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()

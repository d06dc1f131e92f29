"""Write 8 MiB through ``Storage.open_atomic`` and SIGKILL this process before the file is closed.

python -m drills.killed_writer URL     (TEST_ENDPOINT: the S3 endpoint, if any)
"""

import os
import signal
import sys

from pipeline.storage import Storage, StorageOptions


def main() -> None:
    storage = Storage(StorageOptions(endpoint_url=os.environ.get("TEST_ENDPOINT") or None))
    with storage.open_atomic(sys.argv[1]) as handle:
        for _ in range(8):
            handle.write(os.urandom(1 << 20))
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
